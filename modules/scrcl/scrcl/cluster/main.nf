process SCRCL_CLUSTER {
    tag "${meta.id}"
    label 'process_low'
    label 'process_gpu'

    // Dual container: the small CPU image (onnxruntime, no torch) by default, the CUDA image
    // (onnxruntime-gpu) when the task gets an accelerator.
    conda "${ task.accelerator ? "${moduleDir}/environment.gpu.yml" : "${moduleDir}/environment.yml" }"
    container "${ workflow.containerEngine in ['singularity', 'apptainer'] && !task.ext.singularity_pull_docker_container ?
        (task.accelerator ? 'oras://ghcr.io/scrcl-cli/scrcl-cli:0.1.0-cuda-sif' : 'oras://ghcr.io/scrcl-cli/scrcl-cli:0.1.0-sif') :
        (task.accelerator ? 'ghcr.io/scrcl-cli/scrcl-cli:0.1.0-cuda' : 'ghcr.io/scrcl-cli/scrcl-cli:0.1.0') }"

    input:
    tuple val(meta), path(h5ad)
    tuple val(meta2), path(model)

    output:
    tuple val(meta), path("${prefix}.h5ad")       , emit: h5ad
    tuple val(meta), path("${prefix}_markers.csv"), emit: markers
    tuple val("${task.process}"), val('scrcl-cli'), eval('scrcl-cli --version'), emit: versions_scrcl, topic: versions
    tuple val("${task.process}"), val('onnxruntime'), eval('python3 -c "import onnxruntime; print(onnxruntime.__version__)"'), emit: versions_onnxruntime, topic: versions
    tuple val("${task.process}"), val('cuda'), eval('(python3 -c "import torch; print(torch.version.cuda)" 2>/dev/null || echo None) | sed s/None/cpu/'), emit: versions_cuda, topic: versions

    when:
    task.ext.when == null || task.ext.when

    script:
    def args = task.ext.args ?: ''
    prefix = task.ext.prefix ?: "${meta.id}"
    def device = task.accelerator ? 'cuda' : 'cpu'
    if ("${h5ad}" == "${prefix}.h5ad") {
        error("SCRCL_CLUSTER: input and output are both '${prefix}.h5ad'. Set task.ext.prefix to another name.")
    }
    """
    scrcl-cli cluster \\
        ${h5ad} \\
        --model ${model} \\
        --output ${prefix}.h5ad \\
        --markers ${prefix}_markers.csv \\
        --device ${device} \\
        --threads ${task.cpus} \\
        ${args}
    """

    stub:
    def args = task.ext.args ?: ''
    prefix = task.ext.prefix ?: "${meta.id}"
    """
    echo ${args}
    touch ${prefix}.h5ad
    touch ${prefix}_markers.csv
    """
}
