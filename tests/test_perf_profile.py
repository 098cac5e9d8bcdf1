"""`c2w perf --profile`: each profiler row lands in one kind; a step's time adds up by kind."""

import argparse

import pytest
import torch

from c2w.perf import add_perf_parser, format_table, run_perf
from c2w.perf_profile import format_profile, op_kind, profile_step


@pytest.mark.parametrize("name, kind", [
    ("aten::mm", "matmul"), ("aten::addmm", "matmul"), ("aten::bmm", "matmul"), ("aten::matmul", "matmul"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention"),
    ("aten::_log_softmax", "softmax/loss"), ("aten::nll_loss_forward", "softmax/loss"), ("aten::logsumexp", "softmax/loss"),
    ("aten::rsqrt", "norm"), ("aten::_fused_rms_norm", "norm"),
    ("aten::copy_", "copy/cast/index"), ("aten::_to_copy", "copy/cast/index"), ("aten::index_select", "copy/cast/index"),
    ("aten::cat", "copy/cast/index"), ("aten::expand", "copy/cast/index"), ("aten::transpose", "copy/cast/index"),
    ("aten::mul", "elementwise"), ("aten::add_", "elementwise"), ("aten::silu", "elementwise"), ("aten::exp_", "elementwise"),
    ("aten::_fused_adamw_", "optimizer"), ("aten::_foreach_norm", "optimizer"), ("Optimizer.step#AdamW.step", "optimizer"),
    ("aten::linalg_vector_norm", "optimizer"),
    ("autograd::engine::evaluate_function: MmBackward0", "framework"), ("_LinearCE", "framework"),
    ("AddmmBackward0", "framework"), ("ScaledDotProductFlashAttentionForCpuBackward0", "framework"),
    ("torch::autograd::AccumulateGrad", "framework"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu_backward", "attention"),
    ("aten::_log_softmax_backward_data", "softmax/loss"), ("aten::silu_backward", "elementwise"),
    ("void gemv2T_kernel_val<int, int, float, float, float, float, 128, 16, 4, 4, false, false>", "matmul"),
    ("void splitKreduce_kernel<32, 16, int, float, float, float, float, true, false, false>", "matmul"),
    ("void at::native::lpnorm_cleanup<float, (at::native::NormType)1, float, float>", "optimizer"),
    # CUDA kernel names, as a replayed graph shows them
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_execute_segment_k_off_kernel__5x_cublas", "matmul"),
    ("nvjet_tst_128x64_64x8_1x1_v_bz_TNT", "matmul"),
    ("ampere_bf16_s16816gemm_bf16_128x64_ldg8_f2f_stages_64x4_tn", "matmul"),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 128, 4, false, false, cutlass::bfloat16_t>>",
     "attention"),
    ("fmha_cutlassF_bf16_aligned_64x64_rf_sm80", "attention"),
    ("void at::native::(anonymous namespace)::cunn_SoftMaxForward<4, float, float, float, at::native::(anonymous "
     "namespace)::LogSoftMaxForwardEpilogue>(float*, float const*, int)", "softmax/loss"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<at::native::(anonymous namespace)::"
     "FusedAdamMathFunctor<float, 4>>", "optimizer"),
    ("void at::native::unrolled_elementwise_kernel<at::native::direct_copy_kernel_cuda(at::TensorIteratorBase&)>",
     "copy/cast/index"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::BinaryFunctor<float, float, float, "
     "at::native::binary_internal::MulFunctor<float>>>", "elementwise"),
    ("Memcpy HtoD (Pageable -> Device)", "copy/cast/index"),
    ("mkldnn::_linear_pointwise", "matmul"), ("mkldnn::_reorder_linear_weight", "copy/cast/index"),
    ("aten::some_new_op", "other"),
])
def test_op_kind_names_each_row_once(name, kind):
    assert op_kind(name) == kind


def test_profile_step_splits_a_steps_time_by_kind():
    a = torch.randn(384, 384)

    def step():
        for _ in range(4):
            (a @ a).mul_(0.5)

    step()  # c2w perf profiles after its timed rounds: warm
    p = profile_step(step, torch.device("cpu"), steps=3)
    assert p["steps"] == 3 and p["device"] == "cpu"
    assert p["op_ms"] == pytest.approx(sum(p["by_kind"].values()))
    assert 0 < p["op_ms"] <= p["wall_ms"] * 1.05  # self times on the calling thread fit in the wall time
    assert max(p["by_kind"], key=p["by_kind"].get) == "matmul"
    assert p["top"][0][0] == "aten::mm" and p["top"][0][2] == 4  # calls per step
    ms = [r[1] for r in p["top"]]
    assert ms == sorted(ms, reverse=True)
    head, top = format_profile(p)
    assert "matmul" in head and "aten::mm" in top
    with pytest.raises(ValueError, match="at least 1"):
        profile_step(step, torch.device("cpu"), steps=0)


def test_run_perf_profile_reports_both_paths(tiny):
    res = run_perf(shape="tiny", batch=2, seq=12, repeats=1, threads=1, tokenizer=tiny.tokenizer, decode_tokens=2,
                   decode_batches=(1,), workloads=["write", "decode"], profile=1)
    assert res["setup"]["profile_steps"] == 1
    for d in (res["write"]["detail"], res["decode"]["by_batch"]["1"]["detail"]):
        for path in ("plain", "c2w"):
            p = d[path]["profile"]
            assert p["steps"] == 1 and p["op_ms"] > 0 and p["by_kind"]["matmul"] > 0
    table = format_table(res)
    assert "profile write c2w" in table and "profile decode b1 plain" in table
    assert "profile" not in run_perf(shape="tiny", batch=2, seq=12, repeats=1, threads=1, tokenizer=tiny.tokenizer,
                                     workloads=["write"])["write"]["detail"]["c2w"]
    with pytest.raises(ValueError, match="profile"):
        run_perf(shape="tiny", tokenizer=tiny.tokenizer, workloads=["write"], profile=-1)


def test_perf_parser_profile_flag():
    ap = argparse.ArgumentParser()
    add_perf_parser(ap.add_subparsers(dest="command"))
    assert ap.parse_args(["perf"]).profile == 0
    assert ap.parse_args(["perf", "--profile"]).profile == 2
    assert ap.parse_args(["perf", "--profile", "5", "--json"]).profile == 5
    assert ap.parse_args(["perf", "--profile", "--json"]).profile == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_profile_sees_the_kernels_of_a_graph_replay():
    """A replayed CUDA graph shows no operators: the profile must count its kernels (CUPTI)."""
    a = torch.randn(512, 512, device="cuda")
    out = a @ a
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        out = a @ a
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(g):
        out = (a @ a).relu_()
    p = profile_step(g.replay, torch.device("cuda"), steps=3)
    assert out.shape == a.shape and p["device"] == "cuda" and p["op_ms"] > 0
    assert p["by_kind"].get("matmul", 0) > 0, p
