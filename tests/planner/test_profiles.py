"""The shipped profile book (coverage, pricing against the catalog, physical sanity, sources), the YAML
loader's errors, lookups, and the single-profile read/write round trip."""

from __future__ import annotations

import dataclasses
import math
from importlib import resources
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from skyfleet.config import ConfigError
from skyfleet.cost.catalog import Catalog
from skyfleet.planner.profiles import ProfileBook, ProfileError, read_profile, write_profile
from skyfleet.planner.types import EngineProfile

GiB = 2**30
#: (memory GiB per GPU as nvidia-smi reports it, memory bandwidth GB/s): datasheets
GPUS = {"T4": (14.58, 320), "L4": (22.49, 300), "A10G": (22.49, 600), "L40S": (44.99, 864),
        "A100": (39.59, 1555), "A100-80GB": (79.15, 2039), "H100": (79.65, 3350)}
#: (weight bytes, KV bytes per token): config.json of each model (layers x KV heads x head dim x 2 x 2 B)
MODELS = {"llama-3.1-8b": (16.06e9, 32 * 8 * 128 * 2 * 2), "qwen2.5-7b": (15.23e9, 28 * 4 * 128 * 2 * 2),
          "llama-3.1-70b": (141.1e9, 80 * 8 * 128 * 2 * 2), "llama-3.1-8b-awq": (5.73e9, 32 * 8 * 128 * 2 * 2)}


@pytest.fixture(scope="module")
def book() -> ProfileBook:
    return ProfileBook.builtin()


def test_builtin_covers_the_models_and_gpus(book: ProfileBook) -> None:
    assert {"llama-3.1-8b", "qwen2.5-7b", "llama-3.1-70b"} <= set(book.models())
    for model in ("llama-3.1-8b", "qwen2.5-7b"):
        assert {p.gpu for p in book if p.model == model and p.gpus == 1} == {"L4", "A10G", "L40S", "A100", "H100"}
    assert {p.gpu for p in book if p.model == "llama-3.1-70b"} >= {"H100", "A100", "A100-80GB", "L40S"}
    assert all(p.gpus >= 2 for p in book if p.model == "llama-3.1-70b")  # 141 GB of weights
    t4 = book.get("T4", "llama-3.1-8b-awq")  # 8B fp16 does not fit 16 GB; only the int4 variant
    assert "AWQ" in t4.source and not [p for p in book if p.gpu == "T4" and p.model == "llama-3.1-8b"]
    assert all(p.engine == "vllm" for p in book)


def test_every_profile_can_be_priced(book: ProfileBook) -> None:
    catalog = list(Catalog.builtin())
    for p in book:
        matching = [t for t in catalog if t.accelerator == p.gpu and t.accelerator_count == p.gpus]
        assert matching, f"no instance type with {p.gpus}x{p.gpu} for {p.model}"
        assert all(book.for_instance(t, p.model) == p for t in matching)
    g5 = next(t for t in catalog if t.name == "g5.xlarge")
    assert book.for_instance(g5, "llama-3.1-70b") is None  # one A10G holds no 70B


def test_profiles_are_physically_possible(book: ProfileBook) -> None:
    for p in book:
        mem_gib, bandwidth = GPUS[p.gpu]
        weights, kv_bytes = MODELS[p.model]
        label = f"{p.model} on {p.gpus}x{p.gpu}"
        # the KV cache and the weights fit in 90% of the memory
        assert weights + p.kv_capacity_tokens * kv_bytes <= p.gpus * mem_gib * GiB * 0.9, label
        # and leave at most the activation reserve (1.5 GiB per GPU) plus a block unused
        slack = p.gpus * mem_gib * GiB * 0.9 - weights - p.kv_capacity_tokens * kv_bytes
        assert slack <= p.gpus * 1.5 * GiB + 16 * kv_bytes, label
        # decoding reads every weight each step: no faster than the memory bandwidth allows
        assert p.tpot_base_s >= weights / (p.gpus * bandwidth * 1e9), label
        assert p.ttft_base_s >= p.tpot_base_s  # a prefill reads the weights at least once
        assert 0 < p.tpot_batch_slope < 0.1 and p.prefill_tokens_per_s > 100, label
        assert p.max_model_len <= p.kv_capacity_tokens and p.max_num_seqs == 256, label
        assert 60 <= p.cold_start_s <= 1800, label
        p.sim_profile()  # a valid simulator profile


def test_faster_memory_decodes_faster(book: ProfileBook) -> None:
    order = ["L4", "A10G", "L40S", "A100", "H100"]
    for model in ("llama-3.1-8b", "qwen2.5-7b"):
        tpots = [book.get(g, model, gpus=1).tpot_base_s for g in order]
        assert tpots == sorted(tpots, reverse=True), model
    h100 = [book.get("H100", "llama-3.1-70b", gpus=n) for n in (2, 4, 8)]
    assert h100[0].tpot_base_s > h100[1].tpot_base_s > h100[2].tpot_base_s
    assert h100[0].kv_capacity_tokens < h100[1].kv_capacity_tokens < h100[2].kv_capacity_tokens


def test_every_profile_cites_its_source(book: ProfileBook) -> None:
    for p in book:
        assert "https://" in p.source and ("measured" in p.source or "derived" in p.source), p
        # each derived number says how
        for what in ("prefill derived", "kv derived", "ttft_base derived", "cold start derived"):
            assert what in p.source, (p.model, p.gpu, what)
    measured_a100 = book.get("A100", "llama-3.1-8b")
    assert measured_a100.tpot_base_s == 0.0133 and "johnmusgrave.com" in measured_a100.source


def test_lookups(book: ProfileBook) -> None:
    assert book.get("h100", "LLAMA-3.1-70B").gpus == 2  # case-insensitive, fewest GPUs by default
    assert book.get("H100", "llama-3.1-70b", gpus=8).gpus == 8
    with pytest.raises(ProfileError) as err:
        book.get("H100", "llama-3-8b")
    assert "did you mean llama-3.1-8b" in str(err.value) and "Known: llama-3.1-8b on 1xL4 (vllm)" in str(err.value)
    with pytest.raises(ConfigError, match=r"no profile for llama-3\.1-70b on 3xH100"):
        book.get("H100", "llama-3.1-70b", gpus=3)
    assert len(list(book)) == len(book) == 20


def _entry(**kw: object) -> dict[str, object]:
    base: dict[str, object] = {
        "gpu": "L4", "gpus": 1, "model": "m", "engine": "vllm", "prefill_tokens_per_s": 1000,
        "ttft_base_s": 0.05, "tpot_base_s": 0.05, "tpot_batch_slope": 0.03, "kv_capacity_tokens": 30000,
        "max_num_seqs": 256, "cold_start_s": 300, "source": "test"}
    base.update(kw)
    return base


@pytest.mark.parametrize(("entry", "what"), [
    (_entry(tpot_base_s="fast"), "profiles[0] (m on 1xL4): field 'tpot_base_s' must be a finite number"),
    (_entry(gpus=0), "field 'gpus' must be a positive whole number"),
    (_entry(prefill_tokens_per_s=0), "field 'prefill_tokens_per_s' must be positive"),
    (_entry(tpot_batch_slope=-0.1), "field 'tpot_batch_slope' must be zero or more"),
    (_entry(colour="red"), "unknown field(s) colour"),
    (_entry(source=""), "field 'source' must be a non-empty string"),
    ({k: v for k, v in _entry().items() if k != "kv_capacity_tokens"}, "missing field(s) kv_capacity_tokens"),
])
def test_load_errors_name_the_file_entry_and_field(tmp_path: Path, entry: dict[str, object], what: str) -> None:
    import yaml

    path = tmp_path / "book.yaml"
    path.write_text(yaml.safe_dump({"profiles": [entry]}))
    with pytest.raises(ProfileError) as err:
        ProfileBook.load(path)
    assert str(err.value).startswith(f"{path}: profiles[0]") and what in str(err.value)


def test_load_file_level_errors(tmp_path: Path) -> None:
    import yaml

    path = tmp_path / "book.yaml"
    path.write_text(yaml.safe_dump({"profiles": [_entry(), _entry(tpot_base_s=0.01)]}))
    with pytest.raises(ProfileError, match="two profiles for m on 1xL4"):
        ProfileBook.load(path)
    path.write_text("profiles: [")
    with pytest.raises(ProfileError, match="not valid YAML"):
        ProfileBook.load(path)
    path.write_text("- 1\n")
    with pytest.raises(ProfileError, match="a 'profiles' list"):
        ProfileBook.load(path)
    with pytest.raises(ProfileError, match="no such profiles file"):
        ProfileBook.load(tmp_path / "absent.yaml")
    path.write_text(yaml.safe_dump({"profiles": [_entry(gpus=2), _entry()]}))
    book = ProfileBook.load(path)
    assert book.get("L4", "m").gpus == 1 and book.models() == ["m"]
    measured = dataclasses.replace(book.get("L4", "m"), tpot_base_s=0.04, source="measured: here")
    assert book.with_profiles([measured]).get("L4", "m").tpot_base_s == 0.04 and book.get("L4", "m").tpot_base_s == 0.05


profiles = st.builds(
    EngineProfile, gpu=st.sampled_from(["H100", "L4", "cpu"]), gpus=st.integers(1, 8),
    model=st.text("abcdefghijklmnopqrstuvwxyz0123456789.-", min_size=1, max_size=20),
    engine=st.sampled_from(["vllm", "llama", "sglang"]),
    prefill_tokens_per_s=st.floats(1e-3, 1e6), ttft_base_s=st.floats(0, 10), tpot_base_s=st.floats(1e-6, 1),
    tpot_batch_slope=st.floats(0, 2), kv_capacity_tokens=st.integers(1, 10**7), max_num_seqs=st.integers(1, 4096),
    cold_start_s=st.floats(0, 3600), source=st.text(min_size=1, max_size=200).filter(lambda s: s.strip() == s and s),
    max_model_len=st.integers(1, 10**6))


@settings(max_examples=60, deadline=None)
@given(profiles)
def test_write_and_read_a_profile_round_trip(tmp_path_factory: pytest.TempPathFactory, p: EngineProfile) -> None:
    path = tmp_path_factory.mktemp("p") / "profile.yaml"
    write_profile(p, path, comment="line one\n\nline three")
    assert read_profile(path) == p
    assert path.read_text().startswith("# line one\n#\n# line three\n")


def test_the_measured_llamacpp_profile_ships_and_reads() -> None:
    ref = resources.files("skyfleet.planner").joinpath("data/measured/smollm2-135m-llamacpp-cpu.yaml")
    with resources.as_file(ref) as path:
        p = read_profile(path)
    assert p.engine == "llama" and p.model == "smollm2-135m-instruct" and p.source.startswith("measured: ")
    assert all(math.isfinite(v) and v > 0 for v in (p.prefill_tokens_per_s, p.tpot_base_s, p.cold_start_s))
    with pytest.raises(ProfileError, match="no such profile file"):
        read_profile("/nonexistent/profile.yaml")


def test_a_source_with_a_next_line_character_reads_back_unchanged(tmp_path: Path) -> None:
    # Found by the property test above in CI: PyYAML read a raw U+0085 back as a space.
    p = EngineProfile(gpu="L4", gpus=1, model="m", engine="vllm", prefill_tokens_per_s=1.0, ttft_base_s=0.0,
                      tpot_base_s=0.01, tpot_batch_slope=0.0, kv_capacity_tokens=1, max_num_seqs=1,
                      cold_start_s=0.0, source="0\x850 é", max_model_len=1)
    write_profile(p, tmp_path / "p.yaml")
    assert read_profile(tmp_path / "p.yaml") == p
