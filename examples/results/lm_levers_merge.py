"""How lm_levers.csv and classification_levers.csv were assembled (run once; kept for provenance).

The lever studies ran in batches while ScaledOPLoRA's defaults were the papers' settings
(``lm_levers_batch1``, ``lm_levers2``, ``lm_levers3``, ``lm_seeds``: rows named
``ScaledOPLoRA[<settings>]``), then, for the two guards, on the interim defaults (bias correction,
relative damping 1e-3, power 0.5: ``lm_levers4``). A plain class name in a study CSV means its
current defaults, so the rows are renamed to what they mean today -- ``preset=paper`` prefixed to
the first batches, the guards spelled out in the last -- and merged (a run present in two batches
is kept once, from the first)::

    python examples/results/lm_levers_merge.py     # from the repository root
"""

import csv
import os

HERE = os.path.dirname(os.path.abspath(__file__))
GUARDS = {
    "ScaledOPLoRA[current_floor=true,precondition_momentum=true]":
        "ScaledOPLoRA[current_floor=true,precondition_momentum=true]",
    "ScaledOPLoRA[precondition_momentum=true]": "ScaledOPLoRA[current_floor=false,precondition_momentum=true]",
    "ScaledOPLoRA[current_floor=true]": "ScaledOPLoRA[current_floor=true,precondition_momentum=false]",
}


def paper(name: str) -> str:
    if name.startswith("ScaledOPLoRA[preset=paper,"):
        return name
    assert name.startswith("ScaledOPLoRA["), name
    return "ScaledOPLoRA[preset=paper," + name[len("ScaledOPLoRA["):]


def read(stem):
    with open(os.path.join(HERE, stem + ".csv")) as f:
        return list(csv.DictReader(f))


def write(stem, rows):
    with open(os.path.join(HERE, stem + ".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def main() -> None:
    rows, seen = [], set()
    for stem, rename in (("lm_levers_batch1", paper), ("lm_levers2", paper), ("lm_levers3", paper),
                         ("lm_seeds", paper), ("lm_levers4", GUARDS.__getitem__)):
        for row in read(stem):
            row["optimizer"] = rename(row["optimizer"])
            key = (row["optimizer"], row["lr"], row["seed"], row["step"])
            if key not in seen:
                seen.add(key)
                rows.append(row)
    write("lm_levers", rows)
    classification = read("classification_levers")
    for row in classification:
        row["optimizer"] = paper(row["optimizer"])
    write("classification_levers", classification)


if __name__ == "__main__":
    main()
