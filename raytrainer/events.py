"""The callback events of the loop, in the order transformers.Trainer fires them.

raytrainer dispatches them through transformers' own CallbackHandler (one dispatcher), so every
TrainerCallback, EarlyStoppingCallback included, sees the same calls with the same arguments.
tests/test_events.py records a run's events and compares them with transformers.Trainer's.

The loop as pseudocode (loop.py), with each event at its place:

    <on_init_end>                              # Trainer.__init__
    <on_train_begin>
    [evaluate if eval_on_start]                # <on_evaluate>, <on_log>
    for epoch in epochs:
        <on_epoch_begin>
        for each accumulation window:
            <on_step_begin>
            for each micro-batch in the window:
                training_step()                # forward, loss / num_items, backward (no_sync but last)
                if not the last micro-batch:
                    <on_substep_end>
            clip gradients
            <on_pre_optimizer_step>
            optimizer.step()
            <on_optimizer_step>
            scheduler.step(); zero_grad(); global_step += 1
            <on_step_end>
            if control.should_log:       <on_log>
            if control.should_evaluate:  <on_evaluate>, <on_log>   # (+ <on_prediction_step> per batch)
            if control.should_save:      snapshot checkpoint, <on_save>
        <on_epoch_end>
        [log / evaluate / save as at a step end]
    [load best model]
    <on_log>                                   # train_runtime, train_loss, ...
    <on_train_end>
"""

TRAIN_EVENTS = (
    "on_init_end",
    "on_train_begin",
    "on_epoch_begin",
    "on_step_begin",
    "on_substep_end",
    "on_pre_optimizer_step",
    "on_optimizer_step",
    "on_step_end",
    "on_log",
    "on_prediction_step",
    "on_evaluate",
    "on_save",
    "on_epoch_end",
    "on_train_end",
)
PREDICT_EVENTS = ("on_prediction_step", "on_predict")
