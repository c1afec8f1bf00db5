"""The OpenAI-compatible HTTP gateway (`semipd api`): a client of the controller through the
asyncio SDK, as vLLM's API server is of its engine core. HTTP parsing, server-sent events and JSON
run in this process, never in the controller's loop, and several gateways may front one controller.
"""
