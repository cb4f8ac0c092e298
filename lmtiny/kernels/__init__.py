"""Numeric kernels with no model knowledge: the chunked, vocabulary-parallel linear + softmax cross-entropy; fp8 matmuls with tensorwise scaling."""
