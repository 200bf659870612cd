"""Write ftkit's bundled offline emotion dataset, ``plugins/data/emotion_quickstart.jsonl``.

    $ python bench/make_emotion_quickstart.py [--per-class 100] [--out plugins/data/emotion_quickstart.jsonl]

The rows come from the emotion task's offline synthesizer (``ftkit_plugins.emotion_synth``, the
same as ``ftkit data synth emotion``): composed for the project, nothing is downloaded. Seeded, so
the same command always writes the same file.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ftkit_plugins.emotion_synth import LABELS, synthesize

# The bundled file's seed: changing it changes every row of the asset.
SEED = 20261123


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=100)
    default_out = Path(__file__).resolve().parent.parent / "plugins" / "data" / "emotion_quickstart.jsonl"
    parser.add_argument("--out", type=Path, default=default_out)
    args = parser.parse_args(argv)
    rows = list(synthesize(args.per_class * len(LABELS), seed=SEED))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", encoding="utf-8", newline="\n") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows)} rows ({args.per_class} per label) to {args.out}")


if __name__ == "__main__":
    main()
