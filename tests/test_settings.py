"""kandinsky_core.settings: the one layer of defaults and rules, used by the CLI / pipeline and the nodes alike.
Every problem comes back at once, tagged with its input, in the words of the front end that asked."""

from __future__ import annotations

import pytest

from kandinsky_core.errors import InputError
from kandinsky_core.nabla import NablaParams
from kandinsky_core.settings import (
    CLI_WORDING,
    NablaChoice,
    SettingsInputError,
    input_problems,
    raise_problems,
    resolve,
    uses_cfg,
)
from kandinsky_core.variants import VARIANTS


def messages(variant, **kw) -> dict[str, str]:
    _, problems = resolve(variant, **kw)
    return {p.input: p.message for p in problems}


def test_errors_name_the_input_and_the_nearest_values():
    cli = dict(wording=CLI_WORDING)
    assert "width=500 must be a multiple of 128" in messages("t2v-lite-sft-10s", width=500, height=512, **cli)["width"]
    assert "384 or 512" in messages("t2v-lite-sft-10s", width=500, height=512, **cli)["width"]
    assert "or add --no-nabla" in messages("t2v-lite-sft-10s", width=500, height=512, **cli)["width"]
    assert "height=500 must be a multiple of 16" in messages("t2v-lite-sft-5s", width=512, height=500, **cli)["height"]
    assert "frames=100 frames must be 4k+1" in messages("t2v-lite-sft-5s", length=100, **cli)["length"]
    assert "97 or 101" in messages("t2v-lite-sft-5s", length=100, **cli)["length"]
    assert "at most 121" in messages("t2v-lite-sft-5s", length=245, **cli)["length"]
    assert "makes 1 frame" in messages("t2i-lite", length=5, **cli)["length"]
    assert messages("t2v-lite-sft-5s", width=528, height=512, length=1) == {}  # any multiple of 16 without NABLA
    assert messages("t2v-pro-sft-10s-hd", width=1280, height=768, length=241) == {}


def test_every_problem_is_reported_with_its_input_not_just_the_first():
    found = messages(
        "t2v-lite-sft-10s", width=500, height=520, length=300, guidance=float("nan"), scheduler_scale=99.0,
        has_start=True,
    )  # fmt: skip
    assert set(found) == {"width", "height", "length", "guidance", "scheduler_scale", "start_image"}, found
    assert found["guidance"].startswith("guidance=nan is not allowed: give a finite number from -1 to 30")
    assert found["start_image"].startswith("start_latent is given but t2v-lite-sft-10s is a T2V model")
    with pytest.raises(SettingsInputError) as e:
        raise_problems(resolve("t2v-lite-sft-10s", width=500, height=520, length=300)[1])
    assert isinstance(e.value, InputError) and len(e.value.problems) == 3
    assert str(e.value).count("\n") == 2  # one line per problem


def test_without_a_model_the_widget_rules_alone():
    assert input_problems(width=768, height=512, length=121) == []
    assert [p.input for p in input_problems(width=768, height=0, length=121)] == ["height"]
    assert [p.input for p in input_problems(width=770, height=500, length=122, guidance=31.0)] == [
        "width", "height", "length", "guidance",
    ]  # fmt: skip


def test_auto_values_come_from_the_variant():
    v = VARIANTS["t2v-lite-distilled16steps-5s"]
    s, problems = resolve(v, steps=0, guidance=-1.0, scheduler_scale=0.0)
    assert problems == []
    assert (s.steps, s.guidance, s.scheduler_scale, s.nabla) == (v.steps, v.guidance, v.scheduler_scale, None)
    assert (s.width, s.height, s.length) == (*v.default_size, v.max_frames)
    assert not s.cfg and uses_cfg(5.0) and not uses_cfg(1.0 + 1e-7)
    s, _ = resolve(v, steps=8, guidance=2.5, scheduler_scale=7.0)
    assert (s.steps, s.guidance, s.scheduler_scale) == (8, 2.5, 7.0)
    assert resolve(VARIANTS["t2i-lite"])[0].length == 1


def test_nabla_choice():
    sparse, dense = VARIANTS["t2v-pro-sft-10s-hd"], VARIANTS["t2v-lite-sft-5s"]
    assert NablaChoice().params(sparse) == NablaParams(0.7, 11, 3, 3)
    assert NablaChoice().params(dense) is None
    assert NablaChoice("off").params(sparse) is None
    assert NablaChoice("on", 0.5, 0, 5, 0).params(sparse) == NablaParams(0.5, 11, 5, 3)
    assert NablaChoice("on").params(dense) == NablaParams(0.9, 11, 3, 3)
    assert "windows must be odd" in messages(dense, nabla=NablaChoice("on", wT=4))["nabla"]
    assert "Allowed: auto, on, off" in messages(dense, nabla=NablaChoice("sometimes"))["nabla"]
    # on forces the 128 px tiles on a dense variant too; the node says how to turn it off
    assert "or set mode to off in Kandinsky 5 NABLA" in messages(dense, nabla=NablaChoice("on"), height=528,
                                                                  width=768)["height"]  # fmt: skip


def test_image_inputs_per_task():
    assert "needs a start image" in messages("i2v-lite-5s")["start_image"]
    assert "needs the image to edit" in messages("i2i-lite")["edit_image"]
    assert messages("i2v-lite-5s", has_start=True) == {}
    cli = messages("t2i-lite", has_edit=True, wording=CLI_WORDING)["edit_image"]
    assert cli.startswith("--image is given but t2i-lite is a T2I model. Remove --image, or pick an I2I variant")
