"""The stages the drivers in recipes/ compose, each a unit a newcomer can read alone:

    pretrain.py   masked-LM pretraining of an encoder on the training code (Ray Train + DeepSpeed ZeRO)
    experts.py    the experts' inputs (tokenizers, encodings) and their training (one Ray Train run each) and logits
    aggregate.py  the router on the experts' outputs, and the soft targets it aggregates
    distill.py    the student, distilled from soft targets (Ray Train + DeepSpeed ZeRO)

The attack stage lives with the attacks (attacks/workers.py). Stages import components only, never a driver.
"""
