"""semipd: semi-PD LLM serving. The public SDK is `from semipd import Client, AsyncClient`."""

from semipd.shared.client import AsyncClient, Client, ClientError, ServerError

__all__ = ["AsyncClient", "Client", "ClientError", "ServerError"]
