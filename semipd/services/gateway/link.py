"""The gateway's link to the controller: one AsyncClient for all its HTTP requests, opened when
first needed, and whether the controller is known to be serving.

Requests go out only while the controller is known to serve: its health is checked every
HEALTH_POLL_S, and before a request whenever the last check (or a request that found the
controller gone: no answer for the client's timeout, a broken connection) did not say "ok". So
while it is down or starting, requests get a 503 at once instead of waiting for an answer."""

import asyncio

from semipd.services.gateway.errors import APIError, unavailable
from semipd.shared.client import AsyncClient, ClientError, ServerTimeout

HEALTH_TIMEOUT_S = 5.0  # a controller that takes longer to answer counts as unreachable
HEALTH_POLL_S = 2.0


class UpstreamController:
    def __init__(self, address: str, served_model_name: str | None):
        self.address = address
        self.model_name = served_model_name  # None until the controller has said its model
        self.serving = False
        self._client: AsyncClient | None = None

    async def health(self) -> dict:
        """The controller's health; a 503 APIError when it does not answer."""
        try:
            health = await asyncio.wait_for(self._connected().health(), HEALTH_TIMEOUT_S)
        except (ClientError, asyncio.TimeoutError) as e:
            await self.lost(e)
            raise unavailable(f"the server at {self.address} does not answer: "
                              f"{e or 'no health reply'}") from None
        self.serving = health["status"] == "ok"
        if self.model_name is None:
            self.model_name = health["model"]
        return health

    async def watch(self) -> None:
        """Check the controller's health every HEALTH_POLL_S, for as long as the gateway runs."""
        while True:
            try:
                await self.health()
            except APIError:
                pass  # self.serving says so
            await asyncio.sleep(HEALTH_POLL_S)

    async def stats(self) -> dict:
        try:
            return await asyncio.wait_for(self._connected().stats(), HEALTH_TIMEOUT_S)
        except (ClientError, asyncio.TimeoutError) as e:
            await self.lost(e)
            raise unavailable(f"the server at {self.address} does not answer") from None

    async def client(self) -> AsyncClient:
        """The client to send a request with, once the controller serves (else a 503)."""
        if not self.serving:
            health = await self.health()
            if not self.serving:
                raise unavailable(f"the server is {health['status']}")
        return self._connected()

    async def lost(self, error: Exception) -> None:
        """A request found the controller gone. ZeroMQ reconnects by itself after a silence; a
        broken client (it failed every request it had) is replaced."""
        self.serving = False
        if not isinstance(error, (ServerTimeout, asyncio.TimeoutError)) and self._client is not None:
            client, self._client = self._client, None
            await client.close()

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()

    def _connected(self) -> AsyncClient:
        if self._client is None:
            try:
                self._client = AsyncClient(self.address)
            except ClientError as e:  # an ipc:// socket nobody listens on: the server is down
                raise unavailable(str(e)) from None
        return self._client
