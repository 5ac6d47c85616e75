# The two commands of the README. Both start from a fresh clone.
.PHONY: demo test bench clean

demo:            ## install, then turn the bundled portrait into a 3D head
	bash scripts/setup.sh
	.venv/bin/portrait3d make examples/astronaut.png --out runs/astronaut --export glb,obj,ply,splat,mp4,gif

test:            ## install with test extras, then run the whole test suite
	bash scripts/setup.sh test
	.venv/bin/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

bench:
	bash scripts/setup.sh test
	.venv/bin/python benchmarks/bench_make.py

clean:
	rm -rf runs .venv .tools build *.egg-info
