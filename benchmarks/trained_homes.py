"""Run the real nightly job once per public user, for benchmarks that type with the personalized
model (benchmarks/phrases.py, benchmarks/typos.py `--homes`).

For each user file, in OUT/dev/USER the job trains on the history without its last fifth (the
dev lines follow it: tune there), and in OUT/test/USER on the whole history (the test lines
follow it: report there). Each holds the throwaway keyboard home the job ran in and job.json,
the job's result (`adapter_path`, `phrases_path`, `status`, `metrics`). A user already done is
skipped, so a stopped run goes on where it was.

    nice python benchmarks/trained_homes.py [USERS_DIR] [--model models/starter]
        [--out /tmp/trained-homes] [--splits dev,test] [--users 'blogger_*']
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_USERS = REPO.parent / "shared" / "corpus" / "users"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("users_dir", nargs="?", type=Path, default=DEFAULT_USERS)
    parser.add_argument("--model", type=Path, default=REPO / "models" / "starter")
    parser.add_argument("--out", type=Path, default=Path("/tmp/trained-homes"))
    parser.add_argument("--splits", default="dev,test")
    parser.add_argument("--users", default="*.jsonl", help="glob of user files in USERS_DIR")
    args = parser.parse_args()

    from wordahead.evaluate.harness import history_and_typed, personalize_in_throwaway_home

    done = {}
    for split in args.splits.split(","):
        if split not in ("dev", "test"):
            parser.error(f"--splits: dev or test, not {split!r}")
        for path in sorted(args.users_dir.glob(args.users)):
            out = args.out / split / path.stem
            result = out / "job.json"
            if not result.exists():
                out.mkdir(parents=True, exist_ok=True)
                history, _ = history_and_typed(path, split == "dev")
                job = personalize_in_throwaway_home(history, args.model, out / "home")
                result.write_text(json.dumps(job.to_json(), indent=1))
            status = json.loads(result.read_text())["status"]
            done[f"{split}/{path.stem}"] = status
            print(f"{split} {path.stem}: {status}", file=sys.stderr, flush=True)
    print(json.dumps({"out": str(args.out), "jobs": done}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
