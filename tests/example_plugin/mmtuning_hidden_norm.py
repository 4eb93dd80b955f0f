"""A third-party loss package: registers `hidden_norm` through the `mmtuning` entry point group.

It penalises the mean squared norm of the language model's last hidden state, reading it from the
same capture hooks the built-in losses use.
"""

import mmtuning_plugin
from mmtuning_plugin.losses import AlignmentLoss, LossOptions


class HiddenNormOptions(LossOptions):
    target: float = 0.0


class HiddenNormLoss(AlignmentLoss):
    Options = HiddenNormOptions

    def attach(self, model, capture):
        self._key = capture.language_output()

    def forward(self, features):
        states = features.output(self._key).float()
        return (states.pow(2).mean() - self.options.target).abs()


@mmtuning_plugin.hookimpl
def register_losses(register):
    register("hidden_norm", HiddenNormLoss)
