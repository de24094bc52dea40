"""Protected-span detectors, in the order the mask applies them (blocks first)."""

from __future__ import annotations

from .blocks import (_detect_blockquotes, _detect_fences, _detect_json, _detect_triple_quotes,
                     _detect_xml, _detect_yaml)
from .inline import (_DQUOTE, _EMAIL, _INLINE_CODE, _NEGATION, _NUMBER, _TEMPLATE,
                     _detect_single_quotes, _detect_urls, _regex_detector)
from .payload import _detect_payload


_DETECTORS: tuple = (
    (_detect_fences, True),
    (_detect_triple_quotes, True),
    (_detect_xml, True),
    (_detect_blockquotes, True),
    (_detect_json, True),
    (_detect_yaml, True),
    (_detect_payload, True),
    (_regex_detector(_INLINE_CODE), False),
    (_regex_detector(_TEMPLATE), False),
    (_detect_urls, False),
    (_regex_detector(_EMAIL), False),
    (_regex_detector(_NEGATION), False),
    (_regex_detector(_DQUOTE), False),
    (_detect_single_quotes, False),
    (_regex_detector(_NUMBER), False),
)
