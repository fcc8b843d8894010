"""Result types of the fidelity audit (``featcache.audit``): checks, factor rows, tables."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from featcache.report import fmt_cosine, markdown_table


@dataclass
class Check:
    """One config-free number: an identity check or a reference comparison."""

    name: str
    cosine: float
    tokens: int
    note: str = ""


@dataclass
class FactorRow:
    """Mean cosine of one factor case, per cache configuration (token-weighted)."""

    factor: str
    case: str
    cosine: dict[str, float]
    tokens: int
    views: int


@dataclass
class AuditResult:
    """What ``audit_store`` measured; ``to_markdown`` / ``to_json`` / ``row`` to read it."""

    identity: list[Check]
    factors: list[FactorRow]
    references: list[Check]
    configs: list[str]
    bank: list[Check] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def row(self, factor: str, case: str) -> FactorRow:
        """The factor row ``(factor, case)``; KeyError when absent."""
        for r in self.factors:
            if (r.factor, r.case) == (factor, case):
                return r
        raise KeyError(f"no audit row ({factor!r}, {case!r})")

    def check(self, name: str) -> Check:
        """The identity check or reference named ``name``."""
        for c in self.identity + self.references + self.bank:
            if c.name.strip() == name.strip():
                return c
        raise KeyError(f"no audit check {name!r}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (NaN as None)."""

        def num(x: float) -> float | None:
            return None if x != x else round(float(x), 6)

        def chk(c: Check) -> dict[str, Any]:
            return {
                "name": c.name.strip(),
                "cosine": num(c.cosine),
                "tokens": c.tokens,
                "note": c.note,
            }

        return {
            "meta": self.meta,
            "configs": self.configs,
            "identity": [chk(c) for c in self.identity],
            "factors": [
                {
                    "factor": r.factor,
                    "case": r.case,
                    "tokens": r.tokens,
                    "views": r.views,
                    "cosine": {k: num(v) for k, v in r.cosine.items()},
                }
                for r in self.factors
            ],
            "references": [chk(c) for c in self.references],
            "bank": [chk(c) for c in self.bank],
        }

    def to_json(self) -> str:
        """``to_dict`` as indented JSON."""
        return json.dumps(self.to_dict(), indent=2)

    def to_markdown(self) -> str:
        """Three tables: identity checks, factors by cache configuration, references."""
        m = self.meta
        head = (
            f"Fidelity audit of teacher `{m.get('teacher')}` on `{m.get('store')}`: "
            f"{m.get('n_views')} views (seed {m.get('seed')}, crop {m.get('crop_size')}, "
            f"compared on the {m.get('grid')} grid, {m.get('grid_n')}x{m.get('grid_n')} "
            f"tokens{', grid-aligned views' if m.get('grid_aligned') else ''}). Mean "
            "per-token cosine between the cached target and the teacher run on the view."
        )
        sets = "; ".join(f"{k} = {{{', '.join(v)}}}" for k, v in m.get("level_sets", {}).items())
        ident = markdown_table(
            ["identity check", "cosine", "tokens", "expected"],
            [[c.name, fmt_cosine(c.cosine), c.tokens, c.note] for c in self.identity],
        )
        fac = markdown_table(
            ["factor", "case", *self.configs, "tokens", "views"],
            [
                [
                    r.factor,
                    r.case,
                    *(fmt_cosine(r.cosine[k]) for k in self.configs),
                    r.tokens,
                    r.views,
                ]
                for r in self.factors
            ],
        )
        ref = markdown_table(
            ["reference (no cache involved)", "cosine", "tokens"],
            [[c.name.strip(), fmt_cosine(c.cosine), c.tokens] for c in self.references],
        )
        parts = [head, ident, f"Cache configurations: {sets}.", fac, ref]
        if self.bank:
            parts.append(
                markdown_table(
                    ["exact view bank (its own views)", "cosine", "tokens", "expected"],
                    [[c.name, fmt_cosine(c.cosine), c.tokens, c.note] for c in self.bank],
                )
            )
        return "\n\n".join(parts) + "\n"


__all__ = ["AuditResult", "Check", "FactorRow"]
