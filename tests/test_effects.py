"""Loading effects (paystream.effects): every way a setting can be wrong names itself."""

from __future__ import annotations

import asyncpg
import pytest

from paystream import effects
from paystream.effects import EffectLoadError, Effects, SqlEffect


def test_the_built_ins_come_first_then_the_setting_in_order() -> None:
    loaded = effects.load("tests.effects_probe:effect, sql:public.probe_sql_on_status")
    assert [e.name for e in loaded] == ["card_validation", "ledger", "outbound", "wallet", "probe", "sql:public.probe_sql_on_status"]
    assert Effects(loaded).migrations()["probe"].name == "migrations"


@pytest.mark.parametrize(("setting", "message"), [
    ("tests.no_such_module:effect", "cannot be loaded"),
    ("tests.effects_probe:nothing", "cannot be loaded"),
    ("tests.effects_probe", "module:attribute"),
    ("sql:no_schema", "sql:schema.function"),
    ("sql:public.f; DROP TABLE x", "sql:schema.function"),
    ("tests.effects_probe:Path", "no `name`"),
    ("tests.effects_probe:effect,tests.effects_probe:effect", "enabled twice"),
])
def test_a_setting_that_cannot_load_names_the_effect(setting: str, message: str) -> None:
    with pytest.raises(EffectLoadError, match=message) as caught:
        effects.load(setting)
    assert setting.split(",")[0].split(";")[0][:12] in str(caught.value) or "twice" in message


async def test_a_sql_effect_must_exist_in_the_database(db: asyncpg.Connection) -> None:
    with pytest.raises(EffectLoadError, match="public.no_such_function"):
        await Effects([SqlEffect("public.no_such_function")]).check(db)


async def test_fields_an_effect_adds_are_merged_in_order(db: asyncpg.Connection) -> None:
    class Adds:
        def __init__(self, name: str, fields: dict) -> None:
            self.name, self.fields = name, fields

        async def on_status(self, conn, transaction, previous_status):  # noqa: ANN001, ANN201
            transaction["status"] = "tampered"  # a copy: the next effect sees the original
            return self.fields

    seen = await Effects([Adds("a", {"x": 1}), Adds("b", {"y": 2})]).run(db, {"status": "succeeded"}, None)
    assert seen == {"x": 1, "y": 2}
