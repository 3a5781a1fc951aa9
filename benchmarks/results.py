"""Where the benchmarks publish: print a run's report and append it to benchmarks/RESULTS.md."""

from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def publish(report: str, append: bool = True, quiet_append: bool = False, path: Path | None = None) -> None:
    """Print the report; unless told otherwise, append it to RESULTS.md (or `path`; every measured table is kept)."""
    print(report)
    if append:
        path = path or RESULTS
        with Path(path).open("a") as f:
            f.write("\n" + report)
        if not quiet_append:
            print(f"appended to {path}")
