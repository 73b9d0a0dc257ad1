"""The command line, `python -m fused_resnet <command>`: cli.py dispatches to bench.py,
check.py and train.py; beside them the data sets (data.py), the training loop that train
and the degradation experiment share (loop.py), the degradation experiment
(degradation.py), torchrun start-up (launch.py), shared argument types and the model
table (arguments.py), and tables, JSON, plots and progress bars (report.py)."""
