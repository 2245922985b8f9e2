"""`chute schema`: print the JSON Schema of a spec file, run.json, manifest.json or output.json.

Owns: nothing but the printing. Not here: the spec's schema, made from its fields
(chute.spec), and the three run-folder schemas shipped as files (chute/schemas/).
"""

from __future__ import annotations

import argparse
import sys
from importlib import resources
from typing import Any

import orjson

from chute.cli.common import EXIT_OK, config
from chute.spec import json_schema


def cmd_schema(args: argparse.Namespace) -> int:
    config(args)  # the schemas do not depend on it, but a --config that cannot be read is an error
    if args.what == "spec":
        doc: Any = json_schema()
    else:
        text = resources.files("chute").joinpath(f"schemas/{args.what}.schema.json").read_bytes()
        doc = orjson.loads(text)
    sys.stdout.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode() + "\n")
    return EXIT_OK
