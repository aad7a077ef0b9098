"""Wait tokens: a run waits, holding no worker, until something outside completes the
token (a person approving, a webhook) or its timeout passes."""

from __future__ import annotations

import hashlib
import secrets

import msgspec

from conveyor.shared.context import RunContext, Start, current_context
from conveyor.shared.errors import ConveyorError, InvalidWait, TokenTimeout
from conveyor.shared.store import WaitRequest
from conveyor.shared.waits import result_decoder, token_outcome

_any = msgspec.json.Decoder()


class Token(msgspec.Struct, frozen=True):
    """A wait token: give `id` to whoever completes it (`Client.complete_token`,
    `conveyor tokens complete`). `expires_at` is epoch milliseconds."""

    id: str
    expires_at: int


async def create_token(timeout: float) -> Token:
    """A token that times out `timeout` seconds from now. In a run it is a step: a replay
    gets the same token."""
    if not timeout > 0:
        raise InvalidWait(f"a token's timeout is seconds > 0, got {timeout!r}")
    ctx = current_context()
    if ctx is None:
        from ._client import active_client

        client = await active_client()
        token_id = f"tok_{secrets.token_hex(16)}"
        expires = await client.store.create_token(token_id, "", int(timeout * 1000))
        return Token(token_id, expires)
    key = ctx.step_key("create_token")
    token_id = _token_id(ctx.info.id, key)

    async def create() -> Token:
        expires = await ctx.store.create_token(token_id, ctx.info.id, int(timeout * 1000))
        return Token(token_id, expires)

    token: Token = await ctx.run_step(key, Token, None, create, (), {})
    return token


async def wait_for_token(token: Token) -> object:
    """The data the token was completed with; TokenTimeout if its timeout passed first.
    Only inside a run: the run waits without holding a worker."""
    ctx = current_context()
    if ctx is None:
        raise ConveyorError("wait_for_token can only be awaited inside a run")
    key = ctx.step_key("wait_for_token")
    request = WaitRequest(key, "token", token.id, until_ms=token.expires_at)
    [saved] = await ctx.wait([request], _linker(ctx, token.id))
    outcome = result_decoder.decode(saved)
    if not outcome.ok:
        raise TokenTimeout(token.id)
    return _any.decode(bytes(outcome.value))


def _linker(ctx: RunContext, token_id: str) -> Start:
    async def start(pending: list[WaitRequest]) -> dict[str, bytes]:
        [request] = pending
        result = await token_outcome(ctx.store, token_id, ctx.info.id, request.key)
        if result is None:
            return {}
        await ctx.store.resolve(ctx.info.id, request.key, token_id, result)
        return {request.key: result}

    return start


def _token_id(run_id: str, step_key: str) -> str:
    digest = hashlib.sha256(f"{run_id}\0{step_key}".encode()).hexdigest()[:32]
    return f"tok_{digest}"
