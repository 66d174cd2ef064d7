"""`hcms_compile.kernels.classify`: profiled kernel and operator names sorted into benchmarks/breakdown.py's classes."""

import pytest

from hcms_compile.kernels import CLASSES, classify

NAMES = {
    # GPU kernels, as the profiler names them
    "ncclDevKernel_SendRecv(ncclDevKernelArgsStorage<4096ul>)": "collective",
    "ncclDevKernel_AllReduce_Sum_f32_RING_LL(ncclDevKernelArgsStorage<4096ul>)": "collective",
    "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x128x128_4x1x1_kernel0_0": "attention",
    "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4, false>>(Flash_fwd_params)":
        "attention",
    "fmha_cutlassF_bf16_aligned_64x128_rf_sm80(PyTorchMemEffAttention::AttentionKernel<...>::Params)": "attention",
    "triton_poi_fused_clone_0": "copy",
    "triton_poi_fused__to_copy_1": "copy",
    "triton_poi_fused_permute_3": "copy",
    # Inductor names a kernel after its origin nodes: these move data for a collective or for SDPA
    "triton_poi_fused_all_to_all_single_clone_0": "copy",
    "triton_poi_fused__scaled_dot_product_cudnn_attention_clone_1": "copy",
    "graph_0_cpp_fused_all_to_all_single_clone_permute_view_0": "copy",
    "triton_poi_fused_cat_1": "concat",
    "triton_poi_fused_cat_clone_2": "concat",
    "triton_poi_fused_scatter_4": "copy",  # scatter holds "cat" but is not a concat
    "triton_red_fused_sum_0": "other",
    "triton_per_fused_clone_sum_5": "copy",
    # the copy-engine exchange's transfers; a host copy stays a copy
    "Memcpy DtoD (Device -> Device)": "collective",
    "Memcpy PtoP (Device -> Device)": "collective",
    "Memcpy HtoD (Pageable -> Device)": "copy",
    "hcms::all_to_all": "collective",
    "void at::native::elementwise_kernel<128, 2, at::native::direct_copy_kernel_cuda(...)>(int, ...)": "copy",
    "void at::native::(anonymous namespace)::CatArrayBatchedCopy<...>(...)": "concat",
    "void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>, ...>(...)": "other",
    "Memset (Device)": "other",
    # CPU operators at the top level of compiled code
    "_c10d_functional::all_to_all_single": "collective",
    "_c10d_functional::wait_tensor": "collective",
    "c10d::alltoall_base_": "collective",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "attention",
    "aten::_scaled_dot_product_cudnn_attention": "attention",
    "graph_1_cpp_fused_permute_0": "copy",
    "cpp_fused_cat_3": "concat",
    "aten::cat": "concat",
    "aten::copy_": "copy",
    "aten::clone": "copy",
    "aten::empty_strided": "other",
    "aten::truncate": "other",
}


@pytest.mark.parametrize("name", list(NAMES))
def test_classify(name):
    assert classify(name) == NAMES[name]


def test_every_class_is_reachable():
    assert set(NAMES.values()) == set(CLASSES)
