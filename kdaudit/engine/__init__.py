"""The engine: everything that trains.

loop.py      the one training loop (one model, or a stack sharing its step skeleton)
stacking.py  several runs of one architecture trained at once as one stacked model
accel.py     device speed-ups of the step (bf16 autocast, channels_last, compile)
evaluate.py  predictions and accuracy/loss of a trained model
teachers.py  everything about a teacher: trained or loaded, its stored outputs, the
             targets and features its students train on, whether it keeps its weights
run.py       one run: build, train, evaluate, compare with the teacher, store
"""
