"""`rlaifv serve`: run the reward service with uvicorn. Flags override `RLAIFV_*` environment variables.

Heavy imports stay inside the function so `rlaifv --help` is instant.
Also runnable as `python -m service.serve_cli`.
"""

from __future__ import annotations

import inspect
import logging
import math
import socket
from collections.abc import Callable
from pathlib import Path
from types import FrameType, UnionType
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union, get_args, get_origin

import typer
import uvicorn

from rlaifv.service.http_protocol import HeadDeadlineH11Protocol

if TYPE_CHECKING:
    from rlaifv.service.settings import Settings

log = logging.getLogger("rlaifv.service")
MAX_HEADER_BYTES = 64 * 1024

# uvicorn's HTTP/1.1 options for every server of ours: h11, whose request line and headers are bounded (the
# httptools parser took a 100 MB header, some 200 MB of memory, while bodies were capped at RLAIFV_MAX_BODY_BYTES);
# a head over MAX_HEADER_BYTES in all is refused (431; h11 alone checked only a head still incomplete after a read)
# and its connection closed, and a head not complete within RLAIFV_HEADER_TIMEOUT_S closes it too
# (`service.http_protocol`). The model, not HTTP parsing, is the cost.
HTTP_OPTIONS: dict[str, Any] = {
    "http": HeadDeadlineH11Protocol,
    "h11_max_incomplete_event_size": MAX_HEADER_BYTES,
    "server_header": False,  # `server: uvicorn` told a scanner what to try
}


def proxy_options(settings: Any) -> dict[str, Any]:
    """Which proxies' X-Forwarded-* headers name the client: uvicorn's default trusted any on 127.0.0.1, so a
    local client (or a same-host sidecar passing the header on) chose its rate-limit bucket per request."""
    trusted = ",".join(settings.forwarded_allow_ips)
    return {"proxy_headers": bool(trusted), "forwarded_allow_ips": trusted or None}


class DrainingServer(uvicorn.Server):
    """uvicorn's server, beginning the app's drain (`service.shutdown.Drain`) when the stop signal comes, beside
    uvicorn's own HTTP drain: both end within `RLAIFV_SHUTDOWN_GRACE_S`, the pod's termination grace."""

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        state = getattr(self.config.app, "state", None)
        drain = getattr(state, "drain", None)
        if drain is not None:
            drain.begin()
        elif state is not None:  # still loading: what the load would start next (job consumers) must not start
            state.shutting_down = True
        super().handle_exit(sig, frame)


def with_settings_flags(command: Callable[..., None], hidden: frozenset[str] = frozenset()) -> Callable[..., None]:
    """`command` with a `--name` option for every Settings field it does not declare itself, passed in its
    `**extra`: every `RLAIFV_*` setting is also the same-named flag (38 of 75 had none), whatever is added to
    Settings later. Help comes from the field's description, with the default; lists are comma-separated.
    `hidden`: settings the command accepts but does not use (kept out of its --help)."""
    from rlaifv.service.settings import Settings

    signature = inspect.signature(command, eval_str=True)  # typer reads a given __signature__ as it is
    declared = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    known = {p.name for p in declared}
    generated = []
    for name, field in Settings.model_fields.items():
        if name in known:
            continue
        kind, note = _flag_type(field.annotation)
        flag = "--" + name.replace("_", "-")
        secret = name.endswith(("api_keys", "api_key", "password"))
        help_text = (field.description or name.replace("_", " ")).rstrip(".") + note
        shown = _shown_default(field.get_default(call_default_factory=True))
        help_text += (f" (default {shown}; " if shown else " (") + f"env RLAIFV_{name.upper()}"
        help_text += "; prefer the env: flags show in `ps`)" if secret else ")"
        option = typer.Option(
            f"{flag}/--no-{flag[2:]}" if kind is bool else flag,
            help=help_text,
            show_default=False,
            hidden=name in hidden,
        )
        generated.append(
            inspect.Parameter(
                name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[kind | None, option]
            )
        )
    command.__signature__ = signature.replace(parameters=[*declared, *generated])  # type: ignore[attr-defined]
    return command


def _shown_default(value: Any) -> str:
    """A setting's default as one would type it ("" for none: unset means "decided at start-up")."""
    if value is None or value == []:
        return ""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list | tuple | frozenset | set):
        return ",".join(map(str, value))
    return f"{value:g}" if isinstance(value, float) else str(value)


def _flag_type(annotation: Any) -> tuple[type, str]:
    """The type a flag takes for a Settings annotation, and what its help should add (the choices, the format)."""
    args = (
        [a for a in get_args(annotation) if a is not type(None)] if get_origin(annotation) in (Union, UnionType) else []
    )
    if args:
        annotation = args[0]
    if get_origin(annotation) is Literal:
        return str, f": {', '.join(map(str, get_args(annotation)))}"
    if get_origin(annotation) is list:
        return str, ", comma-separated"
    if annotation in (bool, int, float, str, Path):
        return annotation, ""
    return str, ""


def fallback_bundle() -> Path:
    """The model served when no bundle is given: the shapes-world bundle shipped in the package."""
    from rlaifv.service.default_model import MissingDefaultBundle, default_bundle

    try:
        return default_bundle()
    except MissingDefaultBundle as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from None


def build_settings(**overrides: Any) -> Settings:
    """Settings from the environment, with the flags that were given on top; a bad value exits 2 naming the flag
    and the variable (a pydantic traceback named only the field)."""
    from pydantic import ValidationError

    from rlaifv.service.settings import Settings

    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        return Settings(**given)
    except ValidationError as exc:
        for error in exc.errors():
            field = str(error["loc"][0]) if error["loc"] else ""
            where = f"--{field.replace('_', '-')} / RLAIFV_{field.upper()}: " if field else ""
            message = error["msg"].removeprefix("Value error, ")
            typer.secho(f"error: {where}{message}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None


def check_bundle(
    bundle: Path, *, weights: bool = True, device: str | None = None, loads_here: bool | None = None
) -> None:
    """What can be known of the bundle before the app starts (`reward.bundle.check_bundle`: manifest, model folders,
    configs, tokenizers and, with `weights`, safetensors headers) and, where the engine loads the weights here,
    `device` (`loads_here`: some model loads in this process; by default where its weights are checked): a missing or
    broken bundle, or a device this machine lacks, exits 2 with its reason (it was a traceback inside uvicorn's
    lifespan, exit 3)."""
    from rlaifv.reward.bundle import check_bundle as check_files
    from rlaifv.reward.errors import ModelLoadError, RewardError
    from rlaifv.reward.models import pick_device

    try:
        check_files(bundle, weights=weights)
    except RewardError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
    if weights if loads_here is None else loads_here:
        try:
            pick_device(device)
        except ModelLoadError as exc:
            typer.secho(f"error: --device / RLAIFV_DEVICE: {exc}", fg=typer.colors.RED, err=True)
            raise typer.Exit(2) from None


def bundle_checks(settings: Any) -> dict[str, Any]:
    """What `check_bundle` checks for these settings: the weights' headers where the transformers engine loads them,
    the device wherever a model loads in this process (the vLLM engine's in-process reference too)."""
    loads_here = settings.engine == "transformers" or settings.vllm_reference == "inprocess"
    return {"weights": settings.engine == "transformers", "device": settings.device, "loads_here": loads_here}


def checked_bundle_settings(settings: Settings) -> Settings:
    """`settings` naming the bundle to serve (the shipped one when none is given), checked before anything loads."""
    bundle = settings.bundle
    if bundle is None:
        bundle = fallback_bundle()
        settings = settings.model_copy(update={"bundle": bundle})
    check_bundle(bundle, **bundle_checks(settings))
    return settings


def bind(host: str, port: int, what: str) -> list[socket.socket]:
    """The listening sockets, bound and listening before the model loads: a port in use exits 2 at once (it was
    found after the whole load and warm-up). Every address `host` resolves to, as uvicorn binds them (`localhost`:
    127.0.0.1 and ::1)."""
    try:
        addresses = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        typer.secho(f"error: --host / RLAIFV_HOST: cannot resolve {host!r}: {exc.strerror}", fg="red", err=True)
        raise typer.Exit(2) from None
    sockets: list[socket.socket] = []
    for family, kind, proto, _, address in dict.fromkeys(addresses):
        sock = socket.socket(family, kind, proto)
        sockets.append(sock)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if port == 0 and len(sockets) > 1:  # port 0: the one the first address got, for every address
                address = (address[0], sockets[0].getsockname()[1], *address[2:])
            sock.bind(address)
            sock.listen(2048)  # bound alone, a second server could bind the same port while this one loads
        except OSError as exc:
            for opened in sockets:
                opened.close()
            typer.secho(f"error: {what}: cannot listen on {host}:{port}: {exc.strerror}", fg="red", err=True)
            raise typer.Exit(2) from None
        sock.set_inheritable(True)
    log.info("listening", extra={"what": what, "addresses": [_shown(sock.getsockname()) for sock in sockets]})
    return sockets


def _shown(address: tuple[Any, ...]) -> str:
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def serve(**given: Any) -> None:
    """Serve best-of-N and rewards over HTTP (FastAPI + uvicorn). Every setting is an RLAIFV_* environment variable
    and the same-named flag (flags win)."""
    from rlaifv.service.log_format import configure_logging

    settings = build_settings(**given)
    configure_logging(settings.log_level)
    # The port first, before the seconds of imports and bundle checks: a restarting server's clients then wait in
    # the listen backlog (then get 503 not_ready while it loads, which the SDK waits out) instead of being refused.
    sockets = bind(settings.host, settings.port, "--port / RLAIFV_PORT")
    try:
        settings = checked_bundle_settings(settings)
        from rlaifv.service.app import create_app

        app = create_app(settings, load_in_background=True)
    except BaseException:  # a refused bundle exits 2: the port is given back at once, not at the process's end
        for sock in sockets:
            sock.close()
        raise
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        log_level=settings.log_level.lower(),
        timeout_graceful_shutdown=math.ceil(settings.shutdown_grace_s),  # None would wait forever
        access_log=False,
        **HTTP_OPTIONS,
        **proxy_options(settings),
    )
    server = DrainingServer(config)

    def stop_after_failed_load() -> None:
        server.should_exit = True

    app.state.on_load_failure = stop_after_failed_load
    server.run(sockets=sockets)
    if app.state.load_error is not None:
        raise typer.Exit(3)  # as uvicorn exits when a lifespan start-up fails (the reason is logged)


with_settings_flags(serve)

if __name__ == "__main__":
    typer.run(serve)
