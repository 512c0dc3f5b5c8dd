"""Each pipeline's call arguments are declared once (its CALL_PARAMS) and everything else derives from them: the
engine's request arguments and HTTP fields, the generate flags, the export's manifest defaults."""

import argparse

import pytest

from framegraph.runtime.pipelines import PIPELINES, pipeline_classes


@pytest.mark.parametrize("kind", sorted(PIPELINES))
def test_the_engine_takes_the_declared_arguments(kind):
    from framegraph.runtime.engine import EnginePipeline

    cls = pipeline_classes()[kind]
    spec = EnginePipeline(cls)
    declared = ["seed", cls.input_param.name, *(p.name for p in cls.call_params)]
    if cls.video_fps_param not in cls.call_params:
        declared.append(cls.video_fps_param.name)
    assert [p.name for p in spec.params] == declared
    assert cls.kind == kind


def test_the_generate_flags_are_the_declared_ones():
    from framegraph.runtime.cli import build_parser

    generate = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    flags = {flag for action in generate.choices["generate"]._actions for flag in action.option_strings}
    for cls in pipeline_classes().values():
        for param in (*cls.call_params, cls.video_fps_param, cls.input_param):
            if param.cli or param is cls.input_param:
                assert param.flag in flags, f"{cls.kind}: {param.name} has no flag {param.flag}"
            elif param.name != "output_type":  # the CLI's own --output-type picks what the video writer gets
                assert param.flag not in flags, f"{cls.kind}: {param.name} is not for the command line"


def test_call_defaults_are_the_declared_defaults_and_reach_the_manifest():
    from framegraph.runtime.demo import DEMO_ARTIFACT
    from framegraph.runtime.manifest import Manifest

    for cls in pipeline_classes().values():
        assert cls.call_defaults == {p.name: p.default for p in cls.call_params if p.default is not None}
    svd = pipeline_classes()["stable-video-diffusion"]
    defaults = Manifest.load(DEMO_ARTIFACT).defaults
    assert {name: defaults[name] for name in svd.call_defaults} == svd.call_defaults
