"""Log lines: logfmt and JSON, fields as keys, one event on one line whatever it holds."""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

from kvm_exporter.logs import MAX_TRACEBACK, MAX_VALUE, JSONFormatter, LogfmtFormatter


def record(msg: str, fields: dict[str, Any] | None = None, exc: bool = False) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise RuntimeError("boom\nsecond line")
        except RuntimeError:
            exc_info = sys.exc_info()
    rec = logging.LogRecord("kvm_exporter.t", logging.ERROR, __file__, 1, msg, (), exc_info)
    if fields is not None:
        rec.fields = fields
    return rec


def test_logfmt_fields_are_keys_quoted_only_when_needed() -> None:
    line = LogfmtFormatter().format(
        record("starting", {"version": "0.1.0", "config": "/etc/a b.yml", "empty": ""})
    )
    assert line.startswith("ts=") and " level=error logger=kvm_exporter.t " in line
    assert line.endswith(' msg="starting" version=0.1.0 config="/etc/a b.yml" empty=""')


def test_booleans_and_integers_keep_their_type_in_json_and_are_bare_in_logfmt() -> None:
    fields = {"tls": False, "up": True, "port": 9429, "text": "false"}
    parsed = json.loads(JSONFormatter().format(record("listening", fields)))
    assert {key: parsed[key] for key in fields} == fields
    assert [type(parsed[key]) for key in fields] == [bool, bool, int, str]
    line = LogfmtFormatter().format(record("listening", fields))
    assert line.endswith(' msg="listening" tls=false up=true port=9429 text=false')


def test_control_characters_are_escaped_so_an_event_stays_one_line() -> None:
    hostile = 'a\nb\rc\td\x1b[31m\x00\x7f\x85\u2028"q"\\'
    line = LogfmtFormatter().format(record(hostile, {"k": hostile}))
    assert "\n" not in line and "\r" not in line and "\x1b" not in line and "\x85" not in line
    assert 'msg="a\\nb\\rc\\td\\u001b[31m\\u0000\\u007f\\u0085\\u2028\\"q\\"\\\\"' in line
    parsed = json.loads(JSONFormatter().format(record(hostile, {"k": hostile})))
    assert parsed["msg"] == hostile and parsed["k"] == hostile


def test_long_values_are_cut_and_say_so() -> None:
    line = LogfmtFormatter().format(record("x" * (MAX_VALUE + 500)))
    assert "x" * MAX_VALUE + '[500 characters cut]"' in line
    assert len(line) < MAX_VALUE + 200


def test_traceback_is_one_field_of_one_line_keeping_its_end() -> None:
    line = LogfmtFormatter().format(record("died", exc=True))
    assert "\n" not in line
    assert ' exc="Traceback (most recent call last):\\n' in line
    assert line.endswith('RuntimeError: boom\\nsecond line"')
    parsed = json.loads(JSONFormatter().format(record("died", exc=True)))
    assert parsed["exc"].endswith("RuntimeError: boom\nsecond line")
    huge = record("died", exc=True)
    assert huge.exc_info is not None and huge.exc_info[1] is not None
    huge.exc_info[1].args = ("y" * (MAX_TRACEBACK * 2),)
    cut = json.loads(JSONFormatter().format(huge))["exc"]
    assert cut.startswith("[") and " characters cut]" in cut and cut.endswith("y" * 100)
