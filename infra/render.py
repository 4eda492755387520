"""Fill the {{Name}} placeholders of a config under infra/ and write a ready copy outside git.

    python infra/render.py infra/aws/cluster.yaml -o outputs/aws-cluster.yaml \
        --values outputs/aws-stack.txt GitCommit=$GIT_COMMIT
    python infra/render.py infra/kuberay/rayjob.yaml --values outputs/k8s.env | kubectl create -f -

The configs in git name what differs per account and per build as placeholders: the registry,
subnets, security group, roles, bucket, database, and the image's tag, which is a commit hash. A
copy per build keeps that hash out of the checkout it names.

Values: KEY=VALUE arguments, or --values files of KEY=VALUE or KEY<TAB>VALUE lines (what
`aws cloudformation describe-stacks --query 'Stacks[0].Outputs[].[OutputKey,OutputValue]' --output text`
prints, and infra/gcp/setup.sh); later ones win. Refused: a placeholder no value fills, a GitCommit
that is not a full commit hash (`latest` or a version would name many builds), a result that is not YAML.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import yaml

PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z]\w*)\s*\}\}")
FORMATS = {"GitCommit": re.compile(r"[0-9a-f]{40}")}


class RenderError(ValueError):
    pass


def placeholders(text: str) -> set[str]:
    return set(PLACEHOLDER.findall(text))


def read_values(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, separator, value = line.partition("\t") if "\t" in line else line.partition("=")
        if not separator:
            raise RenderError(f"{path}: {line!r} is neither KEY=VALUE nor KEY<TAB>VALUE")
        values[key.strip()] = value.strip()
    return values


def render(text: str, values: dict[str, str]) -> str:
    missing = sorted(placeholders(text) - set(values))
    if missing:
        raise RenderError(f"no value for {', '.join(missing)}")
    for key, pattern in FORMATS.items():
        if key in placeholders(text) and not pattern.fullmatch(values[key]):
            raise RenderError(f"{key}={values[key]!r} does not match {pattern.pattern}")
    rendered = PLACEHOLDER.sub(lambda m: values[m.group(1)], text)
    list(yaml.safe_load_all(rendered))  # raises on a value that broke the YAML
    return rendered


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("template", type=Path)
    parser.add_argument("assignments", nargs="*", metavar="KEY=VALUE")
    parser.add_argument("--values", type=Path, action="append", default=[], help="a file of values")
    parser.add_argument("-o", "--output", type=Path, help="where to write (default: stdout)")
    args = parser.parse_intermixed_args(argv)
    values: dict[str, str] = {}
    try:
        for path in args.values:
            values.update(read_values(path))
        for assignment in args.assignments:
            key, separator, value = assignment.partition("=")
            if not separator:
                raise RenderError(f"{assignment!r} is not KEY=VALUE")
            values[key] = value
        rendered = render(args.template.read_text(), values)
    except (RenderError, yaml.YAMLError) as err:
        raise SystemExit(f"render.py: {args.template}: {err}") from None
    if args.output is None:
        sys.stdout.write(rendered)
    else:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(rendered)


if __name__ == "__main__":
    main()
