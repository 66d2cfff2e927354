"""Experiments: one module (or package) per study, the computations its notebooks run. Each
may import the layers below it (``report`` down to ``util``) but never another experiment
(an import-linter contract).

- ``kurtosis``: EXP-003, activation-weighted weight kurtosis against per-language damage;
- ``protection_index``: seed 002's protection index and EXP-005's layer-ablation controls;
- ``information_content``: T-001, information carried by each layer's activations;
- ``weight_structure``: T-002 relative quantization error, T-005 gateway weight structure;
- ``representation_geometry``: T-003 language variance, T-007 bottleneck, T-009 convergence;
- ``error_propagation``: T-004 error growth through the residual stream, T-006 error correlation;
- ``morphology``: T-008, agreement minimal pairs through the logit lens;
- ``rate_distortion``: T-010, the bit-width x protection grid and its fitted law;
- ``lora``: seed 001, classifying LoRA adapters by language from their weights.
"""
