// A tuning spec for iree-compile (--iree-codegen-tuning-spec-path) on Intel
// CPUs with AVX-512, for the fine-tuning step's float32 matmuls (targets.py).
//
// IREE 3.13 gives these matmuls an 8x16 vector tile on AVX-512: one 16-float
// register per row, 8 accumulators of the 32 registers. An 8x32 tile (16
// accumulators, two loads of B per step of K) with 64x128 cache tiles runs
// the plain A.B products (the input gradients) and the transposed-A ones (the
// weight gradients) 1.2-2.3x faster. A.B^T (the forward pass on output-major
// weights) keeps IREE's default, which already runs the LM head at 135
// GFLOP/s. The LM head's input gradient (128x768, K = 50304), the largest
// product of a step, is a plain A.B that split reduction has cut in 16 and
// marked, which the pattern matchers do not take; the last matcher takes any
// float32 linalg.matmul left. A 124M step 1.76-1.96 -> 1.27-1.29 s
// (iree-benchmark-module, alternating).
//
// A LoRA step has no float32 products of that size: its input gradients
// multiply by the frozen float16 base, A (f32) . B (f16). The same tile runs
// those 10-20 % faster (the MLP's two 138 -> 121 and 131 -> 117 ms, the
// attention's 38 -> 30, a step; on the forward's A.B^T, as in float32, it
// is slower): a 124M LoRA step 701-708 -> 664-675 ms (iree-benchmark-module,
// alternating, Intel Xeon).
module attributes {transform.with_named_sequence, iree_codegen.tuning_spec_with_default_entrypoint} {
  transform.named_sequence @apply_wide_tiles(%op: !transform.any_op {transform.readonly}) {
    %config = transform.param.constant #iree_codegen.compilation_info<
      lowering_config = #iree_cpu.lowering_config<cache_parallel = [64, 128, 0], distribution = [64, 128, 0],
                                                  vector_common_parallel = [8, 32, 0], vector_reduction = [0, 0, 1]>,
      translation_info = #iree_codegen.translation_info<pipeline = #iree_cpu.pipeline<DoubleTilingExpert>,
                                                        {enable_loop_peeling}>> -> !transform.any_param
    transform.annotate %op "compilation_info" = %config : !transform.any_op, !transform.any_param
    transform.yield
  }

  transform.named_sequence @keep_default(%op: !transform.any_op {transform.readonly}) {
    transform.yield
  }

  transform.named_sequence @match_matmul(%root: !transform.any_op {transform.readonly}) -> !transform.any_op {
    %ins, %outs = transform.iree.match.cast_compatible_dag_from_root %root {
    ^bb0(%a: tensor<?x?xf32>, %b: tensor<?x?xf32>, %c: tensor<?x?xf32>):
      %r = linalg.matmul ins(%a, %b : tensor<?x?xf32>, tensor<?x?xf32>)
                         outs(%c : tensor<?x?xf32>) -> tensor<?x?xf32>
    } : (!transform.any_op) -> (!transform.any_value, !transform.any_value)
    transform.yield %root : !transform.any_op
  }

  transform.named_sequence @match_transposed_a_matmul(%root: !transform.any_op {transform.readonly})
      -> !transform.any_op {
    %ins, %outs = transform.iree.match.cast_compatible_dag_from_root %root {
    ^bb0(%a: tensor<?x?xf32>, %b: tensor<?x?xf32>, %c: tensor<?x?xf32>):
      %r = linalg.matmul indexing_maps = [affine_map<(d0, d1, d2) -> (d2, d0)>,
                                          affine_map<(d0, d1, d2) -> (d2, d1)>,
                                          affine_map<(d0, d1, d2) -> (d0, d1)>]
                         ins(%a, %b : tensor<?x?xf32>, tensor<?x?xf32>)
                         outs(%c : tensor<?x?xf32>) -> tensor<?x?xf32>
    } : (!transform.any_op) -> (!transform.any_value, !transform.any_value)
    transform.yield %root : !transform.any_op
  }

  transform.named_sequence @match_transposed_b_matmul(%root: !transform.any_op {transform.readonly})
      -> !transform.any_op {
    %ins, %outs = transform.iree.match.cast_compatible_dag_from_root %root {
    ^bb0(%a: tensor<?x?xf32>, %b: tensor<?x?xf32>, %c: tensor<?x?xf32>):
      %r = linalg.matmul indexing_maps = [affine_map<(d0, d1, d2) -> (d0, d2)>,
                                          affine_map<(d0, d1, d2) -> (d1, d2)>,
                                          affine_map<(d0, d1, d2) -> (d0, d1)>]
                         ins(%a, %b : tensor<?x?xf32>, tensor<?x?xf32>)
                         outs(%c : tensor<?x?xf32>) -> tensor<?x?xf32>
    } : (!transform.any_op) -> (!transform.any_value, !transform.any_value)
    transform.yield %root : !transform.any_op
  }

  transform.named_sequence @match_matmul_by_float16(%root: !transform.any_op {transform.readonly})
      -> !transform.any_op {
    %ins, %outs = transform.iree.match.cast_compatible_dag_from_root %root {
    ^bb0(%a: tensor<?x?xf32>, %b: tensor<?x?xf16>, %c: tensor<?x?xf32>):
      %r = linalg.matmul ins(%a, %b : tensor<?x?xf32>, tensor<?x?xf16>)
                         outs(%c : tensor<?x?xf32>) -> tensor<?x?xf32>
    } : (!transform.any_op) -> (!transform.any_value, !transform.any_value)
    transform.yield %root : !transform.any_op
  }

  transform.named_sequence @match_float32_matmul(%root: !transform.any_op {transform.readonly}) -> !transform.any_op {
    transform.match.operation_name %root ["linalg.matmul"] : !transform.any_op
    %a = transform.get_operand %root[0] : (!transform.any_op) -> !transform.any_value
    %b = transform.get_operand %root[1] : (!transform.any_op) -> !transform.any_value
    transform.iree.match.cast_compatible_type %a = tensor<?x?xf32> : !transform.any_value
    transform.iree.match.cast_compatible_type %b = tensor<?x?xf32> : !transform.any_value
    transform.yield %root : !transform.any_op
  }

  transform.named_sequence @__kernel_config(%variant_op: !transform.any_op {transform.consumed})
      -> !transform.any_op attributes {iree_codegen.tuning_spec_entrypoint} {
    %res = transform.foreach_match in %variant_op
        @match_matmul -> @apply_wide_tiles,
        @match_transposed_a_matmul -> @apply_wide_tiles,
        @match_transposed_b_matmul -> @keep_default,
        @match_float32_matmul -> @apply_wide_tiles,
        @match_matmul_by_float16 -> @apply_wide_tiles : (!transform.any_op) -> !transform.any_op
    transform.yield %res : !transform.any_op
  }
}
