"""The sbatch scripts, shipped inside the package so that `seqpar-train launcher=slurm` can submit them."""
