process SCRCL_TRAIN {
    tag "${meta.id}"
    label 'process_medium'
    label 'process_gpu'

    // Dual container: training needs torch. Without task.accelerator the CPU training image
    // (CPU torch, no CUDA libraries), with one the CUDA image (CUDA torch, onnxruntime-gpu).
    conda "${ task.accelerator ? "${moduleDir}/environment.gpu.yml" : "${moduleDir}/environment.yml" }"
    container "${ workflow.containerEngine in ['singularity', 'apptainer'] && !task.ext.singularity_pull_docker_container ?
        (task.accelerator ? 'oras://ghcr.io/scrcl-cli/scrcl-cli:0.1.0-cuda-sif' : 'oras://ghcr.io/scrcl-cli/scrcl-cli:0.1.0-train-cpu-sif') :
        (task.accelerator ? 'ghcr.io/scrcl-cli/scrcl-cli:0.1.0-cuda' : 'ghcr.io/scrcl-cli/scrcl-cli:0.1.0-train-cpu') }"

    input:
    tuple val(meta), path(h5ad)

    output:
    tuple val(meta), path("${prefix}_model"), emit: model
    tuple val(meta), path("${prefix}.h5ad") , emit: h5ad
    tuple val("${task.process}"), val('scrcl-cli'), eval('scrcl-cli --version'), emit: versions_scrcl, topic: versions
    tuple val("${task.process}"), val('cuda'), eval('(python3 -c "import torch; print(torch.version.cuda)" 2>/dev/null || echo None) | sed s/None/cpu/'), emit: versions_cuda, topic: versions

    when:
    task.ext.when == null || task.ext.when

    script:
    def args = task.ext.args ?: ''
    prefix = task.ext.prefix ?: "${meta.id}"
    def device = task.accelerator ? 'cuda' : 'cpu'
    if ("${h5ad}" == "${prefix}.h5ad") {
        error("SCRCL_TRAIN: input and output are both '${prefix}.h5ad'. Set task.ext.prefix to another name.")
    }
    """
    scrcl-cli train \\
        ${h5ad} \\
        --output ${prefix}_model \\
        --out-h5ad ${prefix}.h5ad \\
        --device ${device} \\
        --threads ${task.cpus} \\
        ${args}
    """

    stub:
    def args = task.ext.args ?: ''
    prefix = task.ext.prefix ?: "${meta.id}"
    """
    echo ${args}
    mkdir -p ${prefix}_model
    touch ${prefix}_model/scrcl_model.json
    touch ${prefix}_model/encoder_fused.onnx
    touch ${prefix}_model/encoder_cell.onnx
    touch ${prefix}_model/weights.pt
    touch ${prefix}_model/genes.txt
    touch ${prefix}.h5ad
    """
}
