// Drives the official @anthropic-ai/sdk for Node, unmodified, against the proxy (see
// tests/test_anthropic_node.py). One call per run:
//   node anthropic_node_client.cjs BASE_URL ACTION 'REQUEST-JSON'
// ACTION is create, stream or count_tokens. Prints one JSON line: {message} for create,
// {events, text, message} for stream (events as the SDK parsed them), or {error: {class, status,
// body}} when the SDK raised.
"use strict";
const Anthropic = require("@anthropic-ai/sdk");

const ERRORS = ["BadRequestError", "AuthenticationError", "PermissionDeniedError", "NotFoundError",
                "RateLimitError", "InternalServerError", "APIError"];

async function run(client, action, request) {
  if (action === "create") {
    return { message: await client.messages.create(request) };
  }
  if (action === "count_tokens") {
    return { count: await client.messages.countTokens(request) };
  }
  const stream = client.messages.stream(request);
  const events = [];
  let text = "";
  stream.on("streamEvent", (event) => events.push(event));
  stream.on("text", (delta) => { text += delta; });
  const message = await stream.finalMessage();
  return { events, text, message };
}

async function main() {
  const [baseURL, action, requestJson, apiKey] = process.argv.slice(2);
  const client = new Anthropic({ baseURL, apiKey: apiKey || "unused", maxRetries: 0 });
  let out;
  try {
    out = await run(client, action, JSON.parse(requestJson));
  } catch (err) {
    if (!(err instanceof Anthropic.APIError)) throw err;
    out = { error: { class: ERRORS.find((name) => err instanceof Anthropic[name]), status: err.status,
                     body: err.error } };
  }
  process.stdout.write(JSON.stringify(out) + "\n");
}

main().catch((err) => { process.stderr.write(String(err && err.stack || err) + "\n"); process.exit(1); });
