# bcnn: every target installs what it needs first (a virtual environment in .venv, made once).
#   make demo                      whole pipeline on a generated mini-CUB, CPU, minutes
#   make test                      the test suite (what CI runs); OMP_NUM_THREADS=N sets its CPU threads
#   make test-gpu                  the GPU tests alone (CUDA); PY=python3 runs them with a Python that has torch
#   make data                      download + verify CUB-200-2011 into data/ (or verify your DATA=...)
#   make data DATASET=aircraft     the same for aircraft, cars, nabirds, flowers, dogs, inat2017, inat2018, inat2021
#                                  or inat2021_mini (cars and nabirds: where to get them)
#   make stage1 / make stage2      the recipe; DATA=/path/to/CUB_200_2011 DEVICE=cuda ARGS="--optim.lr=0.5"
#   make stage1 DATASET=cars       its recipe (experiments/<DATASET>_vgg16_stage1.yaml) on data/stanford_cars
#   make stage1 RECIPE=cub_vgg16_matrix_sqrt   another two-stage recipe: experiments/<RECIPE>_stage{1,2}.yaml
#   make train CONFIG=experiments/cub_vgg16_isqrt_cov.yaml   any one config (a one-stage recipe)
#   make sweep CONFIG=experiments/cub_vit_b16_in21k_lora.yaml LRS="1.5e-4 7.5e-4"   one run per learning rate
#                                  (optim.lr and optim.backbone_lr), runs/<config>_lr<lr>, each evaluated on val, then
#                                  one table of their val accuracy; the test split is not read (docs/peft.md)
#   make stage1 GPUS=4             the same on 4 GPUs of this machine (torchrun + DDP); RESTARTS=3 survives crashes
#                                  (re-running any of them resumes from the run directory's last.pt)
#   make eval                      test-split accuracy of stage 2's best.pt (of RECIPE; or CHECKPOINT=...)
#   make stage1 stage2 eval report SEEDS=3   three seeds of each stage (runs/<RECIPE>_stage{1,2}_seed{0,1,2}),
#                                  each evaluated single view and flip, gathered in one table with mean and std
#   make bench ARGS="..."          speed and memory of the training step against its limits (python -m bcnn.bench -h)

PYTHON3 ?= python3
VENV    ?= .venv
# PY=python3 (any Python that already has torch and the packages in setup.py, e.g. a GPU cluster's module or a
# container) runs every target with it as it is; by default a virtual environment is made in .venv.
PY      := $(VENV)/bin/python
VENV_DEP = $(if $(filter $(VENV)/bin/python,$(PY)),venv,)
DATA_DIR ?= data
DATASET ?= cub
# Each dataset's folder under DATA_DIR, as its archive extracts.
FOLDERS = cub:CUB_200_2011 aircraft:fgvc-aircraft-2013b cars:stanford_cars nabirds:nabirds flowers:flowers-102 \
	dogs:stanford_dogs inat2017:inat2017 inat2018:inat2018 inat2021:inat2021 inat2021_mini:inat2021
DATASET_FOLDER = $(patsubst $(DATASET):%,%,$(filter $(DATASET):%,$(FOLDERS)))
DEFAULT_DATA = $(DATA_DIR)/$(DATASET_FOLDER)
DATA    ?= $(if $(DATASET_FOLDER),$(DEFAULT_DATA),$(error DATASET=$(DATASET) has no default folder (cub, aircraft, \
	cars, nabirds, flowers, dogs and the inat ones have); pass DATA=/path/to/your/dataset))
DEVICE  ?= auto
ARGS    ?=
GPUS    ?=
RESTARTS ?= 0
RECIPE  ?= $(DATASET)_vgg16
CONFIG  ?=
CHECKPOINT ?= runs/$(RECIPE)_stage2/best.pt
SEEDS   ?=
LRS     ?=
# make sweep's run directories: $(RUNS)_lr<lr> (another RUNS=runs/... keeps a second sweep beside the first)
RUNS    ?= runs/$(basename $(notdir $(CONFIG)))
# SEEDS=N: train.seed 0 .. N-1, one run directory each; stage 2 of seed k starts from stage 1 of seed k. The val
# split (data.split_seed) stays the same, so the seeds differ in initialisation and batch order only.
# $(call whole,NAME,LEAST,WAY OUT): variable NAME's value when it is a whole number of at least LEAST, else one line
# that says so (0 or "abc" must not quietly mean "not given").
whole = $(if $(shell [ "$($(1))" -ge $(2) ] 2>/dev/null && echo yes),$($(1)),$(error $(1)=$($(1)) is not a whole \
	number of at least $(2); $(3)))
SEED_LIST = $(if $(SEEDS),$(shell seq 0 $$(( $(call whole,SEEDS,1,pass SEEDS=3 for three seeds or leave it out for \
	one run) - 1 ))))
SEEDED  = runs/$(RECIPE)_stage$(1)_seed$$seed
# $(call quote,TEXT): TEXT as one shell word, whatever it holds (spaces, quotes, *): in single quotes, each ' as '\''.
# Every path a user can pass (DATA, DATA_DIR, CONFIG, CHECKPOINT) reaches the shell through it.
quote = '$(subst ','\'',$(1))'

# One process without GPUS; with GPUS=N, torchrun starts N (one per GPU) and restarts them RESTARTS times.
LAUNCH  = $(if $(GPUS),$(PY) -m torch.distributed.run --standalone --nproc_per_node=$(call whole,GPUS,1,pass \
	the number of GPUs to use or leave it out for one process) --max-restarts=$(call whole,RESTARTS,0,pass how \
	often torchrun may restart a failed run),$(PY))

.PHONY: venv demo test test-gpu test-export data stage1 stage2 train sweep eval report bench tensorboard screenshots clean

$(VENV)/.installed: setup.py constraints.txt
	test -x $(PY) || $(PYTHON3) -m venv $(VENV)
	$(PY) -m pip install -c constraints.txt -e ".[dev]"
	touch $@

venv: $(VENV)/.installed

demo: $(VENV_DEP)
	$(PY) -m bcnn.demo --root demo

test: $(VENV_DEP)
	$(PY) -m pytest -q -n auto --dist loadgroup --durations=10 -m "not export_families" tests

# each backbone family but VGG (ResNet, DenseNet, ConvNeXt, DINOv2, Swin) through bcnn.export's ONNX path and its
# parity check (docs/deployment.md); every head's export is in make test
test-export: $(VENV_DEP)
	$(PY) -m pytest -q -n auto -m export_families tests

test-gpu: $(VENV_DEP)
	$(PY) -m pytest -q -m gpu tests

# The default DATA is downloaded (or, for cars and nabirds, verified once placed by hand); a DATA=... of your own
# is only verified, in DATASET's format.
data: $(VENV_DEP)
ifeq ($(DATA),$(DEFAULT_DATA))
	$(PY) -m bcnn.data download --dataset $(DATASET) --root $(call quote,$(DATA_DIR))
else
	$(PY) -m bcnn.data verify --format $(DATASET) --root $(call quote,$(DATA))
endif

stage1: $(VENV_DEP)
ifeq ($(SEEDS),)
	$(LAUNCH) -m bcnn.train --config experiments/$(RECIPE)_stage1.yaml --data-root $(call quote,$(DATA)) \
		--device $(DEVICE) $(ARGS)
else
	for seed in $(SEED_LIST); do $(LAUNCH) -m bcnn.train --config experiments/$(RECIPE)_stage1.yaml \
		--data-root $(call quote,$(DATA)) --device $(DEVICE) --train.seed=$$seed --run-dir=$(call SEEDED,1) $(ARGS) \
		|| exit $$?; done
endif

stage2: $(VENV_DEP)
ifeq ($(SEEDS),)
	$(LAUNCH) -m bcnn.train --config experiments/$(RECIPE)_stage2.yaml --data-root $(call quote,$(DATA)) \
		--device $(DEVICE) $(ARGS)
else
	for seed in $(SEED_LIST); do $(LAUNCH) -m bcnn.train --config experiments/$(RECIPE)_stage2.yaml \
		--data-root $(call quote,$(DATA)) --device $(DEVICE) --train.seed=$$seed --run-dir=$(call SEEDED,2) \
		--train.init_from=$(call SEEDED,1)/best.pt $(ARGS) || exit $$?; done
endif

train: $(VENV_DEP)
	@test -n $(call quote,$(CONFIG)) || { echo "make train needs CONFIG=experiments/<recipe>.yaml"; exit 2; }
	$(LAUNCH) -m bcnn.train --config $(call quote,$(CONFIG)) --data-root $(call quote,$(DATA)) \
		--device $(DEVICE) $(ARGS)

# The learning rate chosen on val: a run of CONFIG per value of LRS (the classifier's and the adapted or fine-tuned
# backbone tensors' lr alike), each best.pt evaluated on val, and bcnn.report's table of them on val. Then evaluate
# the run with the best val top-1, and that one only, on test: make eval CHECKPOINT=<its run>/best.pt.
sweep: $(VENV_DEP)
	@test -n $(call quote,$(CONFIG)) || { echo "make sweep needs CONFIG=experiments/<recipe>.yaml"; exit 2; }
	@test -n $(call quote,$(strip $(LRS))) || { echo "make sweep needs LRS=\"1e-3 1e-4\", the learning rates to try"; \
		exit 2; }
	for lr in $(foreach lr,$(LRS),$(call quote,$(lr))); do run=$(call quote,$(RUNS))_lr$$lr; \
		$(LAUNCH) -m bcnn.train --config $(call quote,$(CONFIG)) --data-root $(call quote,$(DATA)) --device $(DEVICE) \
		--optim.lr=$$lr --optim.backbone_lr=$$lr --run-dir="$$run" $(ARGS) || exit $$?; \
		$(LAUNCH) -m bcnn.eval --checkpoint "$$run/best.pt" --split val --data-root $(call quote,$(DATA)) \
		--device $(DEVICE) || exit $$?; done
	$(PY) -m bcnn.report --split val $(foreach lr,$(LRS),$(call quote,$(RUNS)_lr$(lr)))

eval: $(VENV_DEP)
ifeq ($(SEEDS),)
	$(LAUNCH) -m bcnn.eval --checkpoint $(call quote,$(CHECKPOINT)) --split test --data-root $(call quote,$(DATA)) \
		--device $(DEVICE) $(ARGS)
else
	for seed in $(SEED_LIST); do for tta in none flip; do $(LAUNCH) -m bcnn.eval --checkpoint $(call SEEDED,2)/best.pt \
		--split test --tta $$tta --data-root $(call quote,$(DATA)) --device $(DEVICE) $(ARGS) || exit $$?; \
		done; done
endif

# The evaluations of stage 2 (of every seed with SEEDS=N) in one table: python -m bcnn.report -h.
report: $(VENV_DEP)
	$(PY) -m bcnn.report $(if $(SEEDS),$(foreach seed,$(SEED_LIST),runs/$(RECIPE)_stage2_seed$(seed)),runs/$(RECIPE)_stage2) $(ARGS)

bench: $(VENV_DEP)
	$(PY) -m bcnn.bench $(ARGS)

tensorboard: $(VENV_DEP)
	$(PY) -m tensorboard.main --logdir runs

# The README's TensorBoard pictures: a demo run, TensorBoard, and headless Chromium (apt install chromium). The
# projector draws with WebGL: SwiftShader, Chromium's software renderer, stands in for a GPU.
CHROMIUM ?= chromium
SHOT = $(CHROMIUM) --headless --no-sandbox --disable-gpu --no-first-run --disable-background-networking \
	--disable-component-update --disable-sync --hide-scrollbars --virtual-time-budget=15000
SHOT_WEBGL = $(CHROMIUM) --headless --no-sandbox --use-angle=swiftshader --enable-unsafe-swiftshader --no-first-run \
	--disable-background-networking --disable-component-update --disable-sync --hide-scrollbars \
	--virtual-time-budget=25000

screenshots: demo
	$(PY) -m bcnn.eval --checkpoint demo/runs/stage2/best.pt --split test --projector --no-figures
	$(PY) -c 'from tensorboard.backend.event_processing.event_accumulator import EventAccumulator as E; \
		run = E("demo/runs/stage2", size_guidance={"images": 0}); run.Reload(); \
		open("docs/tensorboard_demo_heatmaps.png", "wb").write(run.Images("val/heatmaps")[-1].encoded_image_string)'
	$(VENV)/bin/tensorboard --logdir demo/runs --port 6123 > demo/tensorboard.log 2>&1 & pid=$$!; \
	$(VENV)/bin/tensorboard --logdir demo/runs/stage2/projector_best_test --port 6124 > demo/tensorboard_projector.log \
		2>&1 & projector=$$!; sleep 10; \
	$(SHOT) --user-data-dir=demo/chromium1 --window-size=1600,1300 --screenshot=docs/tensorboard_demo_scalars.png \
		"http://localhost:6123/?darkMode=false#scalars&tagFilter=%5E(train%7Cval)%2F"; \
	$(SHOT) --user-data-dir=demo/chromium2 --window-size=1600,900 --screenshot=docs/tensorboard_demo_images.png \
		"http://localhost:6123/?darkMode=false#images&tagFilter=augmented"; \
	$(SHOT_WEBGL) --user-data-dir=demo/chromium3 --window-size=1600,1000 \
		--screenshot=docs/tensorboard_demo_projector.png "http://localhost:6124/?darkMode=false#projector"; \
	kill $$pid $$projector

clean:
	rm -rf demo
