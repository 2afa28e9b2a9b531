"""A request body's constraint, from whichever of OpenAI's or vLLM's spellings it used:
response_format, structured_outputs, or guided_json / guided_regex / guided_choice /
guided_grammar. More than one source is refused, and so is any field we would not honour."""
from __future__ import annotations

from typing import Any

from orcinus.structured.params import GrammarError, StructuredOutputsParams

_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}
_BACKENDS = (None, "auto", "llguidance", "guidance")


def structured_spec(body: Any) -> StructuredOutputsParams | None:
    sources: list[tuple[str, StructuredOutputsParams]] = []
    fmt = getattr(body, "response_format", None)
    if fmt is not None and fmt.type != "text":
        if fmt.type == "json_object":
            sources.append(("response_format", StructuredOutputsParams(json_object=True, param="response_format")))
        else:
            schema = fmt.json_schema.schema_
            # OpenAI lets schema be left out (any JSON object); strict or not, the output follows it.
            spec = StructuredOutputsParams(json=schema if schema is not None else {"type": "object"},
                                           param="response_format")
            sources.append(("response_format", spec))
    if body.structured_outputs is not None:
        sources.append(("structured_outputs", StructuredOutputsParams.from_dict(body.structured_outputs)))
    guided = {kind: getattr(body, field) for field, kind in _GUIDED.items() if getattr(body, field) is not None}
    if len(guided) > 1:
        raise GrammarError(f"give one guided_* field, not {', '.join('guided_' + k for k in guided)}", "guided_json")
    if guided:
        (kind, value), = guided.items()
        sources.append((f"guided_{kind}", StructuredOutputsParams(**{kind: value}, param=f"guided_{kind}")))
    if body.guided_decoding_backend not in _BACKENDS:
        raise GrammarError(f"guided_decoding_backend {body.guided_decoding_backend!r} is not available; this "
                           "server's backend is 'llguidance'", "guided_decoding_backend")
    if len(sources) > 1:
        raise GrammarError(f"give one constraint, not {' and '.join(name for name, _ in sources)}", sources[1][0])
    if not sources:
        if body.guided_whitespace_pattern is not None:
            raise GrammarError("guided_whitespace_pattern needs a JSON constraint", "guided_whitespace_pattern")
        return None
    spec = sources[0][1]
    if body.guided_whitespace_pattern is not None:
        if spec.kind not in ("json", "json_object"):
            raise GrammarError("guided_whitespace_pattern applies to JSON constraints only", "guided_whitespace_pattern")
        spec.whitespace_pattern = body.guided_whitespace_pattern
    return spec
