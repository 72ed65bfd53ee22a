"""`make demo`: evaluate the shipped scenarios (Star Wars, BookInfo, DNS) and print their matrices.

Until the live datapath lands this is the offline half of the story: the same engine the datapath
will use, showing for every probe the verdict and the rule that decided it.
"""

from __future__ import annotations

import sys
from pathlib import Path

from cilia.cli.policy import print_tables
from cilia.errors import CiliaError
from cilia.scenario import evaluate, load_scenario

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SCENARIOS = ("starwars.yaml", "bookinfo.yaml", "mediabot-dns.yaml")


def main() -> int:
    failed = 0
    for name in SCENARIOS:
        path = EXAMPLES / name
        try:
            scenario = load_scenario(path.read_text(encoding="utf-8"), str(path))
        except (OSError, CiliaError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        results = evaluate(scenario)
        print(f"==================== {scenario.name} ({path.name}) ====================\n")
        print_tables(results, [s.name for s in scenario.spec.steps], sys.stdout)
        bad = [r for r in results if not r.matches]
        failed += len(bad)
        print(f"{len(results) - len(bad)}/{len(results)} probes as expected\n")
    if failed:
        print(f"{failed} probe(s) differ from their expectations", file=sys.stderr)
        return 1
    print("Try it yourself:  .venv/bin/cilia policy matrix examples/starwars.yaml --check")
    return 0


if __name__ == "__main__":
    sys.exit(main())
