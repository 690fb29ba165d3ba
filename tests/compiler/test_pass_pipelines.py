"""Where the passes sit in the targets' pipelines, and what the cpu pipeline
makes of a pattern several passes share (the passes themselves are tested in
tests/passes)."""

from beats_compiler import compile
from beats_compiler.targets import TARGETS
from passes import get_pass
from tests.helpers import assert_same_on_ort, f32, ops
from tests.passes.test_simplify_shape_reshapes import torchscript_cnn_head


def test_every_pipeline_pass_is_registered():
    for profile in TARGETS.values():
        for name in (*profile.passes, *profile.post_passes):
            assert get_pass(name).name == name


def test_cpu_pipeline_holds_the_graph_cleanups():
    names = TARGETS["cpu"].passes
    for name in ("fuse_conv_affine", "merge_unsqueeze", "eliminate_neutral_elementwise",
                 "eliminate_schema_typed_casts"):
        assert name in names


def test_fuse_transposed_gemm_runs_before_folding():
    names = TARGETS["cpu"].passes
    assert names.index("fuse_transposed_gemm") < names.index("fold_constants")


def test_transposed_dedupe_runs_right_after_dedupe_initializers():
    names = TARGETS["cpu"].passes
    assert names.index("dedupe_transposed_initializers") == names.index("dedupe_initializers") + 1


def test_torchscript_head_compiles_to_pool_flatten_gemm():
    m = torchscript_cnn_head()
    res = compile(m, measure_latency=False)
    assert res.report.verified
    assert ops(res.model) == ["GlobalAveragePool", "Flatten", "Gemm"]
    for b in (1, 6):
        assert_same_on_ort(m, res.model, {"x": f32(b, 8, 4, 4, seed=b)})
