"""The terminal table (rich) and the notes, drawn from the JSON documents of one or
more environments (so host and UML results print side by side)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

Env = dict[str, Any]

NOTES = (
    "Ratio = candidate ÷ baseline, both measured in the same run; shown as the median over "
    "runs [min-max of the per-run ratios]. Higher is better for ktls everywhere.",
    "CPU s/GiB = CPU time (user+sys) of both ends during the transfer, each end measuring "
    "its own thread (getrusage RUSAGE_THREAD; in 'processes' the child has one thread), "
    "summed, per GiB moved.",
)
UML_NOTE = (
    "UML: the guest kernel's own work (TCP, and kTLS crypto in generic C without AES-NI) "
    "runs inside the host's UML process as user-space code; inside the guest, getrusage "
    "books it to the calling thread as user time (sys stays ~0) in 10 ms ticks. Compare "
    "CPU figures only between paths in the same UML column. The guest has {cpus} CPU, so "
    "the two ends take turns. User-space crypto (ssl, ktls software) still uses AES-NI "
    "there, so kernel-vs-ssl ratios inside UML say nothing about a real kernel's speed."
)


def notes(envs: Sequence[Env]) -> list[str]:
    """The notes that go under the table (and into the JSON)."""
    uml = [env["environment"] for env in envs if env["environment"]["inside_uml"]]
    return [*NOTES, *(UML_NOTE.format(cpus=e["cpu_count"]) for e in uml[:1])]


def _group(name: str) -> str:
    return name.split("/", 1)[0]


def _spread_cell(summary: dict[str, float] | None, fmt: str, suffix: str = "") -> str:
    if summary is None:
        return "—"
    return f"{summary['median']:{fmt}}{suffix} [{summary['min']:{fmt}}-{summary['max']:{fmt}}]"


def _short(reason: str, limit: int = 70) -> str:
    """The last line of an error (a child's traceback ends with the exception)."""
    line = reason.strip().splitlines()[-1] if reason.strip() else reason
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _row_cell(row: dict[str, Any] | None) -> str:
    if row is None:
        return "—"
    if row["summary"] is None:
        return f"[yellow]{escape(_short(row['missing'] or 'no data'))}[/]"
    return "[bold]" + _spread_cell(row["summary"], ".2f", "x").replace(" [", "[/] [", 1)


def _suite_names(envs: Sequence[Env]) -> list[str]:
    names: list[str] = []
    for env in envs:
        names += [n for n in env["suites"] if n not in names]
    return names


def _ordered(envs: Sequence[Env], suite: str, key: str) -> dict[str, str]:
    """name -> label of every row (or path) of ``suite``, in first-seen order."""
    seen: dict[str, str] = {}
    for env in envs:
        for name, item in env["suites"].get(suite, {}).get(key, {}).items():
            seen.setdefault(name, item["label"])
    return seen


def _env_header(env: Env) -> str:
    return f"{env['environment']['name']}\n{env['config']['runs']} run(s)"


def ratio_table(envs: Sequence[Env], suite: str) -> Table:
    table = Table(title=f"{suite}: ratios (headline)", title_justify="left", show_lines=False)
    table.add_column("row")
    for env in envs:
        table.add_column(_env_header(env), justify="right")
    group = None
    for name, label in _ordered(envs, suite, "rows").items():
        if group is not None and _group(name) != group:
            table.add_section()
        group = _group(name)
        cells = [_row_cell(env["suites"].get(suite, {}).get("rows", {}).get(name)) for env in envs]
        table.add_row(f"{group}: {label}", *cells)
    return table


def _path_cells(path: dict[str, Any] | None) -> list[str]:
    if path is None:
        return ["—", ""]
    if path["status"] != "ok":
        colour = "yellow" if path["status"] == "skipped" else "red"
        return [f"[{colour}]{escape(_short(path['reason']))}[/]", ""]
    summary = path["summary"]
    cpu = summary["cpu_s_per_gib"]
    return [
        _spread_cell(summary["value"], ",.0f" if summary["value"]["median"] >= 100 else ",.1f"),
        "" if cpu is None else f"{cpu['median']:.2f}",
    ]


def absolute_table(envs: Sequence[Env], suite: str) -> Table:
    table = Table(title=f"{suite}: absolute, median [min-max]", title_justify="left")
    table.add_column("path")
    table.add_column("unit")
    for env in envs:
        table.add_column(_env_header(env), justify="right")
        table.add_column("CPU s/GiB", justify="right")
    group = None
    for name, label in _ordered(envs, suite, "paths").items():
        if group is not None and _group(name) != group:
            table.add_section()
        group = _group(name)
        found = [env["suites"].get(suite, {}).get("paths", {}).get(name) for env in envs]
        unit = next((p["unit"] for p in found if p is not None), "")
        cells = [cell for path in found for cell in _path_cells(path)]
        table.add_row(f"{group}: {label}", unit, *cells)
    return table


def render(envs: Sequence[Env], console: Console) -> None:
    for env in envs:
        e = env["environment"]
        console.print(
            f"[bold]{e['name']}[/]: Python {e['python']}, ssl {e['ssl_openssl']}, pyOpenSSL "
            f"{e['pyopenssl']} ({e['pyopenssl_openssl']}), cryptography {e['cryptography']}, "
            f"{e['cpu_count']} CPU, kTLS: {'yes' if e['ktls_available'] else e['ktls_missing']}"
        )
    for suite in _suite_names(envs):
        console.print(ratio_table(envs, suite))
        console.print(absolute_table(envs, suite))
    for note in notes(envs):
        console.print(f"• {escape(note)}")
