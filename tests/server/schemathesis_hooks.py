"""Schemathesis hooks for ``test_fuzz.py`` (loaded through ``SCHEMATHESIS_HOOKS``): path parameters (tenants,
adapter names, key ids) that carry control characters — a final newline above all, which ``$`` once let through
(issue 10) — beside the values schemathesis generates from the spec, and beside ids that exist."""
from __future__ import annotations

from urllib.parse import unquote

import schemathesis
from hypothesis import strategies as st

CONTROLS = ["\n", "\r\n", "\r", "\x00", "\x1b", "\x7f", "\t", "\x0b", "\x85", "\u2028", "\ufeff"]
EXISTING = {"tenant": "acme", "name": "sentiment"}  # test_fuzz uploads acme/sentiment first


def _inject(params: dict, key: str, control: str, where: str, existing: bool) -> dict:
    value = EXISTING.get(key, params[key]) if existing else params[key]
    value = {"end": value + control, "start": control + value, "middle": value[:1] + control + value[1:],
             "only": control}[where]
    return {**params, key: value}


@schemathesis.hook
def flatmap_path_parameters(context, path_parameters):
    names = sorted(k for k, v in (path_parameters or {}).items() if isinstance(v, str))
    if not names:
        return st.just(path_parameters)
    final_newline = st.builds(_inject, st.just(path_parameters), st.sampled_from(names), st.just("\n"),
                              st.just("end"), st.booleans())  # what "$" let through
    anywhere = st.builds(_inject, st.just(path_parameters), st.sampled_from(names), st.sampled_from(CONTROLS),
                         st.sampled_from(["end", "start", "middle", "only"]), st.booleans())
    return st.one_of(st.just(path_parameters), final_newline, anywhere)


@schemathesis.check
def control_characters_in_ids_are_refused(ctx, response, case):
    """A tenant, adapter name or key id with a control character is never accepted (it is not an id)."""
    # by now schemathesis may have percent-encoded them for the URL
    values = [unquote(v) for v in (case.path_parameters or {}).values() if isinstance(v, str)]
    if any(c in v for v in values for c in CONTROLS) and response.status_code < 400:
        raise AssertionError(f"{case.method} {case.formatted_path} answered {response.status_code}")
