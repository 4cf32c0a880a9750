// An app that knows nothing about proxies: the openai SDK with its defaults (Node's built-in
// fetch), OPENAI_API_KEY from the environment, one plain and one streamed chat completion.
const { OpenAI } = require("openai");

async function main() {
  const client = new OpenAI({ maxRetries: 0 });
  const messages = [{ role: "user", content: process.argv[2] || "hello from node" }];
  const plain = await client.chat.completions.create({ model: "gpt-4o", messages });
  console.log(JSON.stringify({ plain: plain.choices[0].message.content }));
  const stream = await client.chat.completions.create({ model: "gpt-4o", messages, stream: true });
  let text = "";
  for await (const chunk of stream) text += chunk.choices[0]?.delta?.content ?? "";
  console.log(JSON.stringify({ streamed: text }));
}

main().catch((err) => {
  console.error(`app failed: ${err.message}${err.cause ? ` (${err.cause.message})` : ""}`);
  process.exit(1);
});
