// mitmroute's Node preload: make the built-in fetch() (and so the `openai` npm package v5+)
// honour HTTPS_PROXY / HTTP_PROXY / NO_PROXY, as curl and Python do. No npm install needed.
//
//   NODE_OPTIONS="--require /path/to/env-proxy.cjs" node app.js   (`mitmroute env` prints it)
//
// Node's fetch is undici, bundled inside Node; it ignores the proxy variables before Node 24
// (NODE_USE_ENV_PROXY=1). This file builds a dispatcher from Node's own bundled undici Agent,
// reached through the global dispatcher slot that fetch itself fills, and gives it a `connect`
// that opens an HTTP CONNECT tunnel through the proxy (TLS to the origin on top, so the origin's
// certificate is checked against Node's roots plus NODE_EXTRA_CA_CERTS). Hosts that NO_PROXY
// names, and every host when no proxy variable is set, keep Node's default agent.
// Node's http/https modules are left alone (Node >= 24.5 covers them with NODE_USE_ENV_PROXY=1).
"use strict";

const http = require("node:http");
const https = require("node:https");
const net = require("node:net");
const tls = require("node:tls");

const SLOT = Symbol.for("undici.globalDispatcher.1");
const CONNECT_TIMEOUT_MS = 10000;

function warn(message) {
  process.emitWarning(`mitmroute env-proxy: ${message}`);
}

function env(name) {
  return process.env[name] || process.env[name.toLowerCase()] || "";
}

function defaultPort(protocol) {
  return protocol === "https:" ? 443 : 80;
}

// NO_PROXY: comma or space separated; `*` is every host; `.example.com` / `*.example.com` and
// `example.com` match the host and its subdomains; `host:port` matches that port only.
function bypassed(hostname, port) {
  const host = hostname.replace(/^\[|\]$/g, "").toLowerCase();
  for (const raw of env("NO_PROXY").split(/[\s,]+/)) {
    let entry = raw.trim().toLowerCase();
    if (!entry) continue;
    if (entry === "*") return true;
    let entryPort = "";
    const m = entry.match(/^(.*?)(?::(\d+))?$/);
    if (m && m[2] && !entry.startsWith("[")) [entry, entryPort] = [m[1], m[2]];
    if (entryPort && Number(entryPort) !== port) continue;
    entry = entry.replace(/^\*?\./, "").replace(/^\[|\]$/g, "");
    if (host === entry || host.endsWith(`.${entry}`)) return true;
  }
  return false;
}

// The proxy URL for an origin, or null to connect directly.
function proxyFor(protocol, hostname, port) {
  const url = protocol === "https:" ? env("HTTPS_PROXY") || env("HTTP_PROXY") : env("HTTP_PROXY");
  if (!url || bypassed(hostname, port)) return null;
  try {
    return new URL(url.includes("://") ? url : `http://${url}`);
  } catch {
    warn(`ignoring the unparsable proxy URL ${JSON.stringify(url)}`);
    return null;
  }
}

// Open a CONNECT tunnel to the origin through `proxy`, then TLS for an https: origin.
function tunnel(proxy, opts, callback) {
  let done = false;
  const finish = (err, socket) => {
    if (done) return;
    done = true;
    callback(err, socket);
  };
  const port = Number(opts.port) || defaultPort(opts.protocol);
  const target = `${opts.hostname}:${port}`;
  const headers = { host: target };
  if (proxy.username) {
    const user = `${decodeURIComponent(proxy.username)}:${decodeURIComponent(proxy.password)}`;
    headers["proxy-authorization"] = `Basic ${Buffer.from(user).toString("base64")}`;
  }
  const viaTls = proxy.protocol === "https:";
  const request = (viaTls ? https : http).request({
    host: proxy.hostname.replace(/^\[|\]$/g, ""),
    port: Number(proxy.port) || defaultPort(proxy.protocol),
    method: "CONNECT",
    path: target,
    headers,
    agent: false,
    setHost: false,
  });
  request.setTimeout(CONNECT_TIMEOUT_MS, () =>
    request.destroy(new Error(`proxy ${proxy.host}: no answer to CONNECT ${target}`)),
  );
  request.once("error", (err) => finish(err));
  request.once("connect", (response, socket, head) => {
    request.setTimeout(0);
    if (response.statusCode !== 200) {
      socket.destroy();
      const why = `${response.statusCode} ${response.statusMessage || ""}`.trim();
      finish(new Error(`proxy ${proxy.host} refused CONNECT ${target}: ${why}`));
      return;
    }
    if (head && head.length) socket.unshift(head);
    if (opts.protocol !== "https:") {
      finish(null, socket);
      return;
    }
    const host = opts.hostname.replace(/^\[|\]$/g, "");
    const secure = tls.connect({
      socket,
      servername: opts.servername || (net.isIP(host) ? undefined : host),
      ALPNProtocols: ["http/1.1"],
    });
    secure.once("error", (err) => {
      socket.destroy();
      finish(err);
    });
    secure.once("secureConnect", () => finish(null, secure));
  });
  request.end();
}

function settle(promise, callback) {
  if (typeof callback !== "function") return promise.then(() => undefined);
  promise.then(() => callback(null, null), callback);
  return undefined;
}

function install() {
  if (typeof globalThis.fetch !== "function") return; // Node < 18: no built-in fetch
  if (!env("HTTPS_PROXY") && !env("HTTP_PROXY")) return;
  // fetch() fills the global dispatcher slot with Node's bundled undici Agent on first use; a
  // data: URL does that without touching the network.
  globalThis.fetch("data:,").catch(() => {});
  const current = globalThis[SLOT];
  if (!current) {
    warn("Node's fetch dispatcher was not found; fetch() will not use the proxy");
    return;
  }
  if (current.constructor.name !== "Agent") return; // Node's own env proxy, or the app's own
  const Agent = current.constructor;

  class EnvProxyAgent extends Agent {
    constructor() {
      super({
        connect(opts, callback) {
          const port = Number(opts.port) || defaultPort(opts.protocol);
          const proxy = proxyFor(opts.protocol, opts.hostname, port);
          if (!proxy) {
            callback(new Error(`mitmroute env-proxy: no proxy for ${opts.hostname}`));
            return;
          }
          tunnel(proxy, opts, callback);
        },
      });
      this.direct = current;
    }

    dispatch(opts, handler) {
      const origin = new URL(String(opts.origin));
      const port = Number(origin.port) || defaultPort(origin.protocol);
      if (!proxyFor(origin.protocol, origin.hostname, port)) {
        return this.direct.dispatch(opts, handler);
      }
      return super.dispatch(opts, handler);
    }

    // undici's close/destroy take an optional callback, else return a promise.
    close(callback) {
      return settle(Promise.all([super.close(), this.direct.close()]), callback);
    }

    destroy(err, callback) {
      if (typeof err === "function") [err, callback] = [null, err];
      return settle(Promise.all([super.destroy(err), this.direct.destroy(err)]), callback);
    }
  }

  globalThis[SLOT] = new EnvProxyAgent();
}

try {
  install();
} catch (err) {
  warn(`not installed: ${err && err.message}`);
}
