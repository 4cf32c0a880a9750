"""Routing: which deployment answers (picker), which are resting (cooldowns), and the retry and
fallback ladder a request climbs when a backend fails (ladder)."""
