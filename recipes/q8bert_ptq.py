"""Q8BERT's post-training quantization with dynamic activation ranges (Zafrir et al. 2019; the "Q8BERT W8A8 PTQ"
row of Bondarenko et al. 2021, Table 6: FP32 softmax, GELU and LayerNorm, dynamic activation quantization).

From the fine-tuned FP32 checkpoint, with neither calibration nor training: the sites and grids of ``q8bert``
(symmetric 8-bit ``[-127, 127]`` weights of every fully connected layer and of the three embedding tables, ranged
by their max |w|; symmetric 8-bit inputs of every fully connected layer), each input ranged by itself at every
call: ``s = max |x| / 127`` over the tensor (NLP Architect's ``DYNAMIC`` mode). Softmax, GELU, LayerNorm, the
attention matmuls and the GEMM outputs stay in floating point.

Two choices where NLP Architect's code differs, both documented in the run's report:

- Padding positions are left out of ``max |x|`` (``calibrate.padding: excluded``, the default), so a batch's
  ranges do not depend on how far it was padded; ``calibrate.padding: included`` counts them, as NLP Architect's
  inputs padded to 128 tokens did.
- Biases stay in floating point; NLP Architect rounds each to an int32 multiple of ``s_x * s_w`` at every call,
  which moves it by at most half of that product.

As with any per-batch dynamic quantization, a sequence's prediction depends on the sequences batched with it
(``evaluate.batch_size`` and the length-grouped order).
"""

from __future__ import annotations

from typing import Any, Literal

from qbert.recipes.base import Quantized
from qbert.recipes.ptq import SitePlanRecipe, StaticQuantParams
from qbert.recipes.qat import Q8BertSites


class Q8BertPtqParams(StaticQuantParams):
    """Q8BERT's dynamic PTQ has no parameters of its own (``sites`` and ``leave_out`` as every static recipe)."""

    name: Literal["q8bert_ptq"] = "q8bert_ptq"


class Q8BertPtq(Q8BertSites, SitePlanRecipe):
    """Q8BERT W8A8 PTQ: ``q8bert``'s sites on the fine-tuned model, activation ranges from each input."""

    name = "q8bert_ptq"
    Params = Q8BertPtqParams
    source = "Zafrir et al. 2019 (Q8BERT, dynamic quantization); Bondarenko et al. 2021 Table 6 (Q8BERT W8A8 PTQ row)"
    needs_calibration = False
    export_formats = ("hf",)  # no static activation ranges for an integer or ONNX graph
    reference_code = None  # NLP Architect's method, not the Bondarenko et al. code

    def prepare(self, model: Any, ctx: Any) -> Quantized:
        """The weights ranged and frozen; every activation quantizer ranges each input itself."""
        q = self.instrumented(model, ctx)
        q.instrumented.set_state("dynamic", kind="activation")
        q.instrumented.token_mask.observe_padding = self.config.calibrate.padding != "excluded"
        return q.but(report={"activation_ranges": "dynamic: max |x| of each input, per tensor",
                             "padding_in_ranges": self.config.calibrate.padding != "excluded",
                             "biases": "floating point"})
