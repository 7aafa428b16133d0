"""The serving config tree: model, engine, replicas, server, router (one pydantic v2 model).

A YAML file in `configs/`, `rayfleet serve --flags`, `serve run rayfleet.cluster.app:build_app
key=value` and KubeRay's `serveConfigV2` `args:` all validate through `RayfleetConfig`. Unknown
keys and bad values fail at load time with the field's dotted path (`ConfigError`).

The `engine` branch is `rayfleet.engine.EngineConfig` unchanged; the `model` branch says what
to serve and is copied into the engine config (`RayfleetConfig.engine_config()`), so the
ingress and the replicas agree on the served model name.

This module imports neither ray nor torch: the CLI loads configs before it starts Ray.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator
from rayfleet.engine import EngineConfig

from .router_config import RouterConfig

# The default model's served name (SmolLM2-135M-Instruct, fetched from PyPI on first use).
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
# Serve's own per-caller queue bound under `router.policy: power-of-two` (Serve's router),
# when `replica.max_queued_requests` is not set.
SERVE_MAX_QUEUED_REQUESTS = 256


class ConfigError(ValueError):
    """A config that failed validation; the message names each bad field by its dotted path."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSection(_Strict):
    """What to serve."""

    path: str | None = Field(
        None, description="Hugging Face model folder or .gguf file; null: the default model"
    )
    served_name: str | None = Field(
        None, description="name clients pass as `model`; default: the folder or file name"
    )
    tokenizer: str | None = Field(None, description="tokenizer folder; default: the model's")

    @property
    def name(self) -> str:
        if self.served_name:
            return self.served_name
        if self.path is None:
            return DEFAULT_MODEL_NAME
        p = Path(self.path.rstrip("/"))
        return p.stem if p.suffix == ".gguf" else p.name


class AutoscalingSection(_Strict):
    """Ray Serve's autoscaling_config (the commonly used fields, checked here at load time)."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    initial_replicas: int | None = Field(None, ge=0)
    target_ongoing_requests: float = Field(32.0, gt=0)
    upscale_delay_s: float = Field(30.0, ge=0)
    downscale_delay_s: float = Field(600.0, ge=0)
    upscaling_factor: float | None = Field(None, gt=0)
    downscaling_factor: float | None = Field(None, gt=0)
    metrics_interval_s: float = Field(10.0, gt=0)
    look_back_period_s: float = Field(30.0, gt=0)

    @model_validator(mode="after")
    def _check(self) -> AutoscalingSection:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas ({self.min_replicas}) must be <= max_replicas ({self.max_replicas})"
            )
        if self.initial_replicas is not None and not (
            self.min_replicas <= self.initial_replicas <= self.max_replicas
        ):
            raise ValueError(
                f"initial_replicas ({self.initial_replicas}) must lie in "
                f"[min_replicas, max_replicas] = [{self.min_replicas}, {self.max_replicas}]"
            )
        return self


class ResourcesSection(_Strict):
    """What one replica reserves from the Ray cluster (its `ray_actor_options`)."""

    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    memory_bytes: int | None = Field(None, ge=0, description="Ray's logical memory reservation")
    accelerator_type: str | None = None
    custom: dict[str, float] = Field(default_factory=dict, description="custom Ray resources")


class ReplicaSection(_Strict):
    """The `LLMServer` deployment: how many replicas and how much each takes."""

    num_replicas: int | None = Field(None, ge=1, description="fixed count (default 1)")
    autoscaling_config: AutoscalingSection | None = None
    # Serve's default (5) starves a continuous-batching engine; keep it >= engine.max_num_seqs.
    max_ongoing_requests: int = Field(128, ge=1)
    # Serve's own bound on requests waiting at each caller (an ingress replica): it counts
    # every request its router has not handed to a replica yet, those parked in rayfleet's
    # admission queue included, so under rayfleet's router (kv-aware, round-robin) it would
    # answer 429 before `router.queue.max_len` fills. Hence:
    # - null (default): rayfleet's router turns Serve's bound off (-1) and the admission
    #   queue (`router.queue.max_len`) is the bound; power-of-two keeps Serve's, at 256.
    # - N >= 1: Serve's bound is N, and the admission queue is capped at N too (it can never
    #   hold more than Serve lets through); requests still being placed or retried after a
    #   replica refused them count as well. -1: Serve's bound off.
    max_queued_requests: int | None = Field(
        None,
        ge=-1,
        description="Serve's per-caller queue bound; null: off under rayfleet's router "
        f"(router.queue.max_len bounds), {SERVE_MAX_QUEUED_REQUESTS} under power-of-two",
    )
    resources: ResourcesSection = Field(default_factory=ResourcesSection)
    health_check_period_s: float = Field(10.0, gt=0)
    health_check_timeout_s: float = Field(30.0, gt=0)
    graceful_shutdown_timeout_s: float = Field(20.0, ge=0)

    @model_validator(mode="after")
    def _check(self) -> ReplicaSection:
        if self.num_replicas is not None and self.autoscaling_config is not None:
            raise ValueError("set either num_replicas or autoscaling_config, not both")
        if self.max_queued_requests == 0:
            raise ValueError("max_queued_requests must be -1 (unbounded) or >= 1, got 0")
        return self

    def ray_actor_options(self) -> dict[str, Any]:
        r = self.resources
        opts: dict[str, Any] = {"num_cpus": r.num_cpus, "num_gpus": r.num_gpus}
        if r.memory_bytes is not None:
            opts["memory"] = r.memory_bytes
        if r.accelerator_type is not None:
            opts["accelerator_type"] = r.accelerator_type
        if r.custom:
            opts["resources"] = dict(r.custom)
        return opts

    def deployment_options(self) -> dict[str, Any]:
        """Keyword arguments for `LLMServer.options(...)`."""
        opts: dict[str, Any] = {
            "max_ongoing_requests": self.max_ongoing_requests,
            # When null: Serve's default for its own router (power-of-two);
            # `app.request_router_options` turns it off (-1) for rayfleet's router.
            "max_queued_requests": (
                SERVE_MAX_QUEUED_REQUESTS
                if self.max_queued_requests is None
                else self.max_queued_requests
            ),
            "ray_actor_options": self.ray_actor_options(),
            "health_check_period_s": self.health_check_period_s,
            "health_check_timeout_s": self.health_check_timeout_s,
            "graceful_shutdown_timeout_s": self.graceful_shutdown_timeout_s,
        }
        if self.autoscaling_config is not None:
            opts["autoscaling_config"] = self.autoscaling_config.model_dump(exclude_none=True)
        else:
            opts["num_replicas"] = 1 if self.num_replicas is None else self.num_replicas
        return opts


class ServerSection(_Strict):
    """The HTTP side: where it listens, who may call it, how much it accepts."""

    host: str = Field("127.0.0.1", description="HTTP host (0.0.0.0: all interfaces)")
    port: int = Field(
        8000,
        ge=0,
        le=65535,
        description="where clients connect: on a cluster `rayfleet serve` starts, the ingress "
        "replica's own HTTP port (direct ingress, `rayfleet.cluster.direct_ingress`), else "
        "Serve's HTTP proxy",
    )
    proxy_port: int = Field(
        0,
        ge=0,
        le=65535,
        description="Serve's HTTP proxy when the ingress serves `port` itself (0: a free port)",
    )
    route_prefix: str = Field("/", pattern=r"^/")
    api_keys: list[SecretStr] = Field(
        default_factory=list, description="accepted `Authorization: Bearer` keys; empty: open"
    )
    api_keys_env: str | None = Field(
        None, description="also accept the comma-separated keys in this environment variable"
    )
    max_request_body_bytes: int = Field(4 << 20, ge=1, description="larger bodies get 413")
    retry_after_s: int = Field(1, ge=0, description="Retry-After on 429")
    max_n: int = Field(16, ge=1, description="largest `n` a request may ask for")
    max_replica_retries: int = Field(
        2,
        ge=0,
        description="re-issue a request whose replica died before it produced a token, up to "
        "this many times (`rayfleet.cluster.retry`); never once a token was sent",
    )
    token_channel: bool = Field(
        True,
        description="replicas stream tokens to the ingress over a socket of its own "
        "(`rayfleet.cluster.token_channel`) instead of as Serve stream items; off: Serve's "
        "handle stream carries them",
    )
    num_ingress_replicas: int = Field(1, ge=1)
    ingress_max_ongoing_requests: int = Field(2048, ge=1)
    ingress_num_cpus: float = Field(0.0, ge=0)
    log_requests: bool = True
    log_prompts: bool = Field(False, description="include prompts in the per-request log line")

    def resolved_api_keys(self) -> list[str]:
        keys = [k.get_secret_value() for k in self.api_keys]
        if self.api_keys_env:
            keys += [k.strip() for k in os.environ.get(self.api_keys_env, "").split(",")]
        return [k for k in keys if k]


class RayfleetConfig(_Strict):
    """The whole serving config."""

    model: ModelSection = Field(default_factory=ModelSection)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    replica: ReplicaSection = Field(default_factory=ReplicaSection)
    server: ServerSection = Field(default_factory=ServerSection)
    router: RouterConfig = Field(default_factory=RouterConfig)
    app_name: str = Field("rayfleet", min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")

    @model_validator(mode="after")
    def _check(self) -> RayfleetConfig:
        for mine, theirs in (
            ("path", "model"),
            ("tokenizer", "tokenizer"),
            ("served_name", "served_model_name"),
        ):
            a, b = getattr(self.model, mine), getattr(self.engine, theirs)
            if a is not None and b is not None and a != b:
                raise ValueError(
                    f"model.{mine} ({a!r}) and engine.{theirs} ({b!r}) disagree: set model.{mine}"
                )
        return self

    @property
    def served_model_name(self) -> str:
        if self.model.served_name is None and self.engine.served_model_name is not None:
            return self.engine.served_model_name
        m = self.model
        if m.path is None and self.engine.model is not None:
            m = ModelSection(path=self.engine.model, served_name=m.served_name)
        return m.name

    def serve_router_config(self) -> RouterConfig:
        """The router section as every request router gets it: `queue.max_len` capped by
        `replica.max_queued_requests` when that is set (and not -1), so the admission queue
        never promises room Serve's own bound would refuse
        (see `ReplicaSection.max_queued_requests`)."""
        cap = self.replica.max_queued_requests
        if cap is None or cap == -1 or cap >= self.router.queue.max_len:
            return self.router
        return self.router.model_copy(
            update={"queue": self.router.queue.model_copy(update={"max_len": cap})}
        )

    def engine_config(self) -> EngineConfig:
        """The engine's config with the model branch folded in."""
        return self.engine.model_copy(
            update={
                "model": self.model.path or self.engine.model,
                "tokenizer": self.model.tokenizer or self.engine.tokenizer,
                "served_model_name": self.served_model_name,
            }
        )

    def to_args(self) -> dict[str, Any]:
        """A plain dict (secrets revealed) that `build_app` and Ray can carry and re-validate."""
        d = self.model_dump(mode="json")
        d["server"]["api_keys"] = [k.get_secret_value() for k in self.server.api_keys]
        return d


# ---------------------------------------------------------------------------------------------
# Loading


def format_validation_error(err: ValidationError, source: str | None = None) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        inp = e.get("input")
        shown = "" if e["type"] in ("extra_forbidden", "missing") else f" (got {inp!r})"
        if isinstance(inp, dict | list):
            shown = ""
        lines.append(f"  {loc}: {msg}{shown}")
    where = f" in {source}" if source else ""
    return f"invalid rayfleet config{where}:\n" + "\n".join(lines)


def parse_config(data: dict[str, Any] | None, source: str | None = None) -> RayfleetConfig:
    """Validate a plain dict; raise ConfigError naming the bad fields."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"a rayfleet config must be a mapping, got {type(data).__name__}")
    try:
        return RayfleetConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source)) from None


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {str(p)!r}")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: a rayfleet config must be a mapping, got {type(data).__name__}")
    return data


def load_config(
    path: str | os.PathLike | None = None, overrides: dict | None = None
) -> RayfleetConfig:
    """Load a YAML config (or the defaults), deep-merge `overrides` (nested or dotted keys)."""
    data = read_yaml(path) if path is not None else {}
    if overrides:
        data = merge(data, overrides)
    return parse_config(data, str(path) if path is not None else None)


def key_value(item: str) -> tuple[str, str]:
    """`KEY=VALUE` from a command line (`--set`, `--weight`) -> (KEY, VALUE); the value is
    left a string. Raises ValueError without an `=` or a key (argparse reports it when
    this is an argument's `type`)."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"expected KEY=VALUE, got {item!r}")
    return key.strip(), value


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge `overrides` into a copy of `base`; keys like "engine.block_size" are paths."""
    out = _deepcopy(base)
    for key, value in overrides.items():
        parts = str(key).split(".")
        node = out
        for p in parts[:-1]:
            nxt = node.get(p)
            if not isinstance(nxt, dict):
                nxt = {}
                node[p] = nxt
            node = nxt
        last = parts[-1]
        if isinstance(value, dict) and isinstance(node.get(last), dict):
            node[last] = merge(node[last], value)
        else:
            node[last] = _deepcopy(value)
    return out


def _deepcopy(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _deepcopy(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_deepcopy(x) for x in v]
    return v
