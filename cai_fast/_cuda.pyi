"""Stubs for cai_fast._cuda, the CUDA kernels of the paged KV pool (built where a CUDA toolkit is
found). Arguments are integers: device addresses (tensor.data_ptr()), sizes, strides in bytes and
the stream (torch.cuda.current_stream().cuda_stream). Used by cai_fast.engine.kv.KVPool, whose
torch path is the twin."""

def store_kv(k_src: int, v_src: int, src_stride: int, k_dst: int, v_dst: int, dst_stride: int, slots: int,
             n: int, row_bytes: int, stream: int) -> None: ...
def zero_blocks(bases: int, num_tensors: int, blocks: int, n: int, block_bytes: int, stream: int) -> None: ...
