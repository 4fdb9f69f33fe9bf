"""Engine performance profiles: how fast one replica of a model is on a given GPU type and count.

:class:`ProfileBook` holds :class:`~skyfleet.planner.types.EngineProfile` values keyed by
``(gpu, gpus, model, engine)``. :meth:`ProfileBook.builtin` reads the shipped ``data/profiles.yaml``
(each entry cites the published benchmark it comes from, or shows how it was derived; see
docs/planner.md); :meth:`ProfileBook.load` reads a book of your own in the same format::

    profiles:
      - gpu: L4            # accelerator name as in the instance catalog
        gpus: 1            # per replica (tensor parallel)
        model: llama-3.1-8b
        engine: vllm
        prefill_tokens_per_s: 3390.0
        ttft_base_s: 0.076
        tpot_base_s: 0.071
        tpot_batch_slope: 0.03
        kv_capacity_tokens: 30992
        max_num_seqs: 256
        cold_start_s: 390.0
        max_model_len: 16384  # optional (32768)
        source: "where the numbers come from"

:func:`read_profile` / :func:`write_profile` read and write one profile as a flat YAML mapping with the
same keys (what ``skyfleet profile`` measures). Unknown keys, missing keys and values of the wrong type
are errors naming the file, the entry and the field.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Iterable, Iterator, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from skyfleet.config import ConfigError
from skyfleet.cost.catalog import InstanceType
from skyfleet.engines.sim.profile import ProfileError as SimProfileError
from skyfleet.planner.types import EngineProfile

__all__ = ["ProfileBook", "ProfileError", "profile_from_mapping", "read_profile", "write_profile"]

_FIELDS = {f.name: f for f in dataclasses.fields(EngineProfile)}
_OPTIONAL = {name for name, f in _FIELDS.items() if f.default is not dataclasses.MISSING}
_STRINGS = ("gpu", "model", "engine", "source")
_POSITIVE_INTS = ("gpus", "kv_capacity_tokens", "max_num_seqs", "max_model_len")
_POSITIVE_FLOATS = ("prefill_tokens_per_s", "tpot_base_s")
_NON_NEGATIVE_FLOATS = ("ttft_base_s", "tpot_batch_slope", "cold_start_s")


class ProfileError(ConfigError):
    """A profile file or lookup that does not work; the message names the file and field, or lists the
    profiles that are known."""


Key = tuple[str, int, str, str]  # (gpu, gpus, model, engine)


def _key(p: EngineProfile) -> Key:
    return (p.gpu, p.gpus, p.model, p.engine)


def _label(p: EngineProfile) -> str:
    return f"{p.model} on {p.gpus}x{p.gpu} ({p.engine})"


def profile_from_mapping(data: Mapping[str, Any], where: str = "profile") -> EngineProfile:
    """An :class:`EngineProfile` from a mapping of its field names; :class:`ProfileError` naming ``where``
    and the field otherwise."""
    if not isinstance(data, Mapping):
        raise ProfileError(f"{where}: a profile is a mapping of field names to values, not {type(data).__name__}")
    unknown = sorted(str(k) for k in data if k not in _FIELDS)
    if unknown:
        raise ProfileError(f"{where}: unknown field(s) {', '.join(unknown)}; known: {', '.join(_FIELDS)}")
    missing = [k for k in _FIELDS if k not in data and k not in _OPTIONAL]
    if missing:
        raise ProfileError(f"{where}: missing field(s) {', '.join(missing)}")
    values: dict[str, Any] = dict(data)
    for name in _STRINGS:
        v = values[name]
        if not isinstance(v, str) or not v.strip():
            raise ProfileError(f"{where}: field '{name}' must be a non-empty string, not {v!r}")
        values[name] = v.strip()
    for name in _POSITIVE_INTS:
        if name not in values:
            continue
        v = values[name]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ProfileError(f"{where}: field '{name}' must be a positive whole number, not {v!r}")
    for name in _POSITIVE_FLOATS + _NON_NEGATIVE_FLOATS:
        v = values[name]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ProfileError(f"{where}: field '{name}' must be a finite number, not {v!r}")
        if v < 0 or (name in _POSITIVE_FLOATS and v == 0):
            need = "positive" if name in _POSITIVE_FLOATS else "zero or more"
            raise ProfileError(f"{where}: field '{name}' must be {need}, not {v!r}")
        values[name] = float(v)
    profile = EngineProfile(**values)
    try:
        profile.sim_profile()
    except SimProfileError as exc:  # pragma: no cover - the checks above are stricter
        raise ProfileError(f"{where}: {exc}") from None
    return profile


def _load_yaml(text: str, where: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ProfileError(f"{where}: not valid YAML: {exc}") from None


class ProfileBook:
    """Profiles keyed by ``(gpu, gpus, model, engine)``; iterate for all of them, in file order."""

    def __init__(self, profiles: Iterable[EngineProfile], *, origin: str = "profiles") -> None:
        self._profiles: dict[Key, EngineProfile] = {}
        for p in profiles:
            if _key(p) in self._profiles:
                raise ProfileError(f"{origin}: two profiles for {_label(p)}")
            self._profiles[_key(p)] = p
        self.origin = origin

    @classmethod
    def builtin(cls) -> ProfileBook:
        """The shipped profiles (``skyfleet/planner/data/profiles.yaml``)."""
        text = resources.files("skyfleet.planner").joinpath("data/profiles.yaml").read_text()
        return cls.parse(text, origin="builtin profiles.yaml")

    @classmethod
    def load(cls, path: str | Path) -> ProfileBook:
        """A book from a YAML file with a top-level ``profiles:`` list."""
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ProfileError(f"{p}: no such profiles file") from None
        return cls.parse(text, origin=str(p))

    @classmethod
    def parse(cls, text: str, *, origin: str = "profiles") -> ProfileBook:
        data = _load_yaml(text, origin)
        if not isinstance(data, dict) or not isinstance(data.get("profiles"), list):
            raise ProfileError(f"{origin}: expected a mapping with a 'profiles' list")
        extra = sorted(str(k) for k in data if k != "profiles")
        if extra:
            raise ProfileError(f"{origin}: unknown top-level key(s) {', '.join(extra)}")
        profiles = []
        for i, entry in enumerate(data["profiles"]):
            label = ""
            if isinstance(entry, dict):
                label = f" ({entry.get('model', '?')} on {entry.get('gpus', '?')}x{entry.get('gpu', '?')})"
            profiles.append(profile_from_mapping(entry, f"{origin}: profiles[{i}]{label}"))
        return cls(profiles, origin=origin)

    def __iter__(self) -> Iterator[EngineProfile]:
        return iter(self._profiles.values())

    def __len__(self) -> int:
        return len(self._profiles)

    def models(self) -> list[str]:
        """The models with at least one profile, sorted."""
        return sorted({p.model for p in self._profiles.values()})

    def get(self, gpu: str, model: str, engine: str = "vllm", gpus: int | None = None) -> EngineProfile:
        """The profile of ``model`` on ``gpu`` (names compared case-insensitively); with ``gpus`` None, the
        one with the fewest GPUs. :class:`ProfileError` listing what is known if there is none."""
        found = sorted((p for p in self._profiles.values()
                        if p.gpu.lower() == gpu.lower() and p.model.lower() == model.lower()
                        and p.engine.lower() == engine.lower() and (gpus is None or p.gpus == gpus)),
                       key=lambda p: p.gpus)
        if found:
            return found[0]
        want = f"{model} on {'' if gpus is None else f'{gpus}x'}{gpu} ({engine})"
        hint = ""
        if model.lower() not in {m.lower() for m in self.models()}:
            close = difflib.get_close_matches(model, self.models(), n=3)
            hint = f" Unknown model '{model}'" + (f"; did you mean {', '.join(close)}?" if close else ".")
        known = "; ".join(_label(p) for p in self._profiles.values())
        raise ProfileError(f"no profile for {want} in {self.origin}.{hint} Known: {known or 'none'}")

    def for_instance(self, instance: InstanceType, model: str, engine: str = "vllm") -> EngineProfile | None:
        """The profile whose gpu and count are the instance type's accelerator and count, if any."""
        for p in self._profiles.values():
            if (p.gpu.lower() == instance.accelerator.lower() and p.gpus == instance.accelerator_count
                    and p.model.lower() == model.lower() and p.engine.lower() == engine.lower()):
                return p
        return None

    def with_profiles(self, profiles: Iterable[EngineProfile]) -> ProfileBook:
        """A new book with ``profiles`` added, replacing those with the same key (a measured profile
        overriding a published one)."""
        merged = dict(self._profiles)
        for p in profiles:
            merged[_key(p)] = p
        return ProfileBook(merged.values(), origin=self.origin)


def read_profile(path: str | Path) -> EngineProfile:
    """One profile from a flat YAML mapping (what :func:`write_profile` and ``skyfleet profile`` write)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ProfileError(f"{p}: no such profile file") from None
    return profile_from_mapping(_load_yaml(text, str(p)), str(p))


def write_profile(profile: EngineProfile, path: str | Path, *, comment: str | None = None) -> None:
    """Write ``profile`` as a flat YAML mapping (field order as in :class:`EngineProfile`), with an
    optional leading ``# comment`` block (e.g. the raw measurements)."""
    data = {f: getattr(profile, f) for f in _FIELDS}
    body = yaml.safe_dump(data, sort_keys=False, width=110, allow_unicode=True)
    if yaml.safe_load(body) != data:
        # PyYAML folds a NEL (U+0085) written raw in a quoted scalar into a space on reading; the
        # ASCII-only form escapes it (and every other non-ASCII character), so it reads back exactly.
        body = yaml.safe_dump(data, sort_keys=False, width=110, allow_unicode=False)
    head = "".join(f"# {line}\n".replace("# \n", "#\n") for line in comment.splitlines()) if comment else ""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(head + body, encoding="utf-8")
