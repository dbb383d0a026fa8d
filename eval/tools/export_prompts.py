"""Regenerate eval/classnames/*.txt and eval/templates/*.txt from the installed clip_benchmark package.

The class names and prompt templates are OpenAI CLIP's (MIT licence, github.com/openai/CLIP, notebooks
and data/prompts.md) as collected by LAION's CLIP_benchmark (MIT licence). They are data files here so
that suites are reproducible without the package; run this once after upgrading clip_benchmark:

    .venv/bin/python eval/tools/export_prompts.py
"""
import json
import os

import clip_benchmark.datasets as cbd

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    base = os.path.dirname(cbd.__file__)
    classnames = json.load(open(os.path.join(base, "en_classnames.json")))
    templates = json.load(open(os.path.join(base, "en_zeroshot_classification_templates.json")))
    for sub, data in (("classnames", classnames), ("templates", templates)):
        os.makedirs(os.path.join(HERE, sub), exist_ok=True)
        for name, lines in sorted(data.items()):
            if name == "dummy" or not isinstance(lines, list):
                continue
            with open(os.path.join(HERE, sub, f"{name}.txt"), "w") as f:
                f.write("\n".join(line.replace("\n", " ") for line in lines) + "\n")
    print(f"wrote {len(classnames)} class lists and {len(templates)} template lists under {HERE}")


if __name__ == "__main__":
    main()
