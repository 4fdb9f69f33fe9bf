"""skyfleet profile: measure a live OpenAI-compatible engine and write its planner profile (YAML).

The sweep and the fits are in :mod:`skyfleet.planner.measure`; this module parses options, shows a
progress bar, prints observed-vs-fitted numbers and writes the file
(:func:`skyfleet.planner.profiles.write_profile`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def profile(
    endpoint: Annotated[str, typer.Option(help="Base URL of the engine, e.g. http://10.0.0.5:8000.")],
    gpu: Annotated[str, typer.Option(help="Accelerator as named in the instance catalog (H100, L4, cpu...).")],
    gpus: Annotated[int, typer.Option(min=1, help="Accelerators behind this replica (tensor parallel).")],
    out: Annotated[Path, typer.Option(help="Profile YAML to write.")],
    model: Annotated[str | None, typer.Option(help="Model id to request (default: the first /v1/models).")] = None,
    api_key: Annotated[str | None, typer.Option(help="Bearer token, if the endpoint wants one.")] = None,
    engine: Annotated[str | None, typer.Option(help="Engine name for the profile (default: detected).")] = None,
    max_prompt_tokens: Annotated[int, typer.Option(min=32, help="Longest prompt of the prefill sweep.")] = 2048,
    max_concurrency: Annotated[int, typer.Option(min=1, help="Largest batch of the decode sweep.")] = 8,
    repeats: Annotated[int, typer.Option(min=1, help="Requests per prompt length.")] = 3,
    rounds: Annotated[int, typer.Option(min=1, help="Waves per concurrency level.")] = 2,
    output_tokens: Annotated[int, typer.Option(min=2, help="Tokens generated per decode request.")] = 64,
    kv_capacity: Annotated[int | None, typer.Option(
        help="KV-cache tokens, if the engine does not report them (vLLM and llama.cpp do).")] = None,
    max_num_seqs: Annotated[int | None, typer.Option(help="Most requests running at once (default: "
                                                           "the engine's, else 256).")] = None,
    cold_start: Annotated[float | None, typer.Option(
        min=0, help="Seconds from instance request to READY (not measurable from a running endpoint).")] = None,
    timeout: Annotated[float, typer.Option(min=1, help="Seconds per request.")] = 300.0,
) -> None:
    """Measure a live engine (prefill and decode sweeps, client-side timing) and write its profile."""
    import asyncio

    import httpx
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from skyfleet.planner.measure import (
        MeasureError,
        SweepPlan,
        probe_engine,
        run_sweep,
        summary_rows,
        to_profile,
    )
    from skyfleet.planner.profiles import write_profile

    base = endpoint.rstrip("/").removesuffix("/v1")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    console = Console(stderr=True)
    cold_note = f"given ({cold_start:g} s)" if cold_start is not None else \
        "not measured (default 300 s; pass --cold-start)"

    async def go() -> None:
        async with httpx.AsyncClient(base_url=base, headers=headers, timeout=timeout) as client:
            info = await probe_engine(client, model)
            limit = max_prompt_tokens
            if info.max_model_len is not None:
                limit = min(limit, info.max_model_len - max(output_tokens, 2) - 16)
            if limit < 32:
                raise MeasureError(f"the model's context ({info.max_model_len}) is too short to measure")
            conc = max_concurrency if info.max_num_seqs is None else min(max_concurrency, info.max_num_seqs)
            plan = SweepPlan.geometric(max_prompt_tokens=limit, max_concurrency=conc, prefill_repeats=repeats,
                                       decode_rounds=rounds, decode_output_tokens=output_tokens)
            console.print(f"[bold]{info.model}[/] at {base} (engine: {info.engine or 'unknown'}, "
                          f"KV: {info.kv_capacity_tokens or '?'} tokens): prompts {list(plan.prompt_lengths)}, "
                          f"concurrency {list(plan.concurrencies)}, {plan.requests} requests")
            with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                          TimeElapsedColumn(), console=console) as bar:
                task = bar.add_task("measuring", total=plan.requests)

                def step(s: object) -> None:
                    bar.update(task, advance=1, description=f"measuring ({getattr(s, 'phase', '')})")

                m = await run_sweep(client, info.model, plan, progress=step)
            prof = to_profile(m, info, gpu=gpu, gpus=gpus, endpoint=base, engine=engine,
                              cold_start_s=cold_start if cold_start is not None else 300.0,
                              cold_start_note=cold_note, kv_capacity_tokens=kv_capacity,
                              max_num_seqs=max_num_seqs)
            rows = summary_rows(m)
            for line in rows:
                console.print(line)
            write_profile(prof, out, comment="\n".join(["written by `skyfleet profile`; observed vs fitted:", *rows]))
            console.print(f"prefill {prof.prefill_tokens_per_s:.1f} tokens/s, ttft base {prof.ttft_base_s * 1000:.1f} ms, "
                          f"tpot {prof.tpot_base_s * 1000:.2f} ms x (1 + {prof.tpot_batch_slope:.3f} (B-1)), "
                          f"KV {prof.kv_capacity_tokens} tokens -> {out}")

    try:
        asyncio.run(go())
    except (MeasureError, httpx.HTTPError) as exc:
        typer.echo(f"skyfleet: {exc}", err=True)
        raise typer.Exit(1) from None
