"""The Hugging Face Hub without a network: transformers' push, or one clear line and training goes on.

Ray workers never reach these: their args have push_to_hub=False (the driver pushes).
"""

from __future__ import annotations

import logging
import os

import transformers

from .redact import redact_file, redact_text

logger = logging.getLogger("raytrainer")
_CARD_ARGS = ("language", "license", "tags", "model_name", "finetuned_from", "tasks", "dataset_tags", "dataset",
              "dataset_args")


class HubHooks(transformers.Trainer):
    _hub_unreachable = None  # why the Hub could not be reached, once init_hf_repo has failed

    def init_hf_repo(self, token=None, private=None):
        """transformers' repo creation; without a network, one clear line and training goes on."""
        try:
            return super().init_hf_repo(token=token, private=private)
        except Exception as e:  # noqa: BLE001 - offline mode, no route: "not now"; a refused token: an error
            said = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
            if getattr(getattr(e, "response", None), "status_code", None) in (401, 403):
                raise ValueError(redact_text(
                    f"push_to_hub: the Hugging Face Hub refused the token ({said}). Set hub_token (or HF_TOKEN, or "
                    f"run `hf auth login`) to a token with write access to {self.args.hub_model_id or 'the repo'}, "
                    "or set push_to_hub=False.")) from None
            self._hub_unreachable = said
            self.hub_model_id = None
            logger.warning("push_to_hub: the Hugging Face Hub is unreachable (%s); training goes on, the model and "
                           "its card are saved in output_dir=%s; push later with trainer.push_to_hub().",
                           self._hub_unreachable, self.args.output_dir)
            return None

    def push_to_hub(self, commit_message="End of training", blocking=True, token=None, revision=None, **kwargs):
        if self._hub_unreachable is None and self.hub_model_id is None:
            self.init_hf_repo(token=token)
        if self._hub_unreachable:
            # what push_to_hub would upload stays on disk: the model (saved by the caller) and its card
            self.create_model_card(model_name=self.args.hub_model_id or os.path.basename(
                os.path.abspath(self.args.output_dir)), **{k: v for k, v in kwargs.items() if k in _CARD_ARGS})
            logger.warning("push_to_hub: not pushed (the Hub is unreachable); model card written to %s",
                           os.path.join(self.args.output_dir, "README.md"))
            return None
        return super().push_to_hub(commit_message=commit_message, blocking=blocking, token=token,
                                   revision=revision, **kwargs)

    def create_model_card(self, *args, **kwargs):
        super().create_model_card(*args, **kwargs)
        if self.is_world_process_zero():  # transformers' card may quote a storage URI or a dataset's signed URL
            redact_file(os.path.join(self.args.output_dir, "README.md"))

    def _push_from_checkpoint(self, checkpoint_folder):
        if self._hub_unreachable or self.hub_model_id is None:
            return None
        return super()._push_from_checkpoint(checkpoint_folder)
