"""The public APIs besides OpenAI's chat completions, one module each, translated onto chat jobs.

Each module holds the API's request model, pure functions from it to a `ChatCompletionRequest` and from
the chat answer (whole or chunk by chunk) back to the API's objects and events, a `Presenter` that
`ForwardedCall` shows the answer through, and the thin HTTP handlers. Routing, retries, limits and the
ledger are `forwarding`'s, the same for every API.
"""
