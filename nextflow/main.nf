#!/usr/bin/env nextflow
/*
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
    scrcl-cli example pipeline
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
    samplesheet (sample,h5ad,role)
      -> SCRCL_TRAIN on the one row with role 'reference'
      -> SCRCL_EMBED and SCRCL_CLUSTER on every row with role 'query', in parallel,
         all with the model trained on the reference.

    nextflow run nextflow/ -profile docker --input samplesheet.csv --outdir results
    nextflow run nextflow/ -profile test,docker          (after assets/make_test_data.py)
    add 'gpu' to the profiles to give every scrcl task a GPU.
----------------------------------------------------------------------------------------
*/

include { SCRCL_TRAIN   } from '../modules/scrcl/scrcl/train/main'
include { SCRCL_EMBED   } from '../modules/scrcl/scrcl/embed/main'
include { SCRCL_CLUSTER } from '../modules/scrcl/scrcl/cluster/main'

// Read and check the samplesheet (format: assets/schema_input.json). Relative h5ad paths
// are resolved against the folder of the samplesheet. Returns [ meta, h5ad ] lists.
def readSamplesheet(samplesheet) {
    def rows = samplesheet.splitCsv(header: true, strip: true)
    if (!rows) {
        error("Samplesheet ${samplesheet} has no rows. Add one 'reference' row and at least one 'query' row.")
    }
    def columns = rows[0].keySet().collect { name -> name.toString() }
    if (columns != ['sample', 'h5ad', 'role']) {
        error("Samplesheet ${samplesheet} has columns ${columns.join(',')}. Use the header 'sample,h5ad,role'.")
    }
    def ids = rows.collect { row -> row.sample }
    def duplicated = ids.findAll { id -> ids.count(id) > 1 }.unique()
    if (duplicated) {
        error("Samplesheet ${samplesheet} repeats the sample ids ${duplicated.join(', ')}. Give each row its own id.")
    }
    return rows.collect { row ->
        if (!(row.sample ==~ /^[A-Za-z0-9._-]+$/)) {
            error("Samplesheet row '${row.sample}': the sample id may hold only letters, digits, '.', '_' and '-'.")
        }
        if (!(row.role in ['reference', 'query'])) {
            error("Samplesheet row '${row.sample}': role is '${row.role}'. Use 'reference' or 'query'.")
        }
        if (!row.h5ad.endsWith('.h5ad')) {
            error("Samplesheet row '${row.sample}': '${row.h5ad}' is not an .h5ad file.")
        }
        def location = (row.h5ad.startsWith('/') || row.h5ad.contains('://')) ? row.h5ad : samplesheet.parent.resolve(row.h5ad).toString()
        [ [ id: row.sample, role: row.role ], file(location, checkIfExists: true) ]
    }
}

workflow {

    main:
    if (!params.input) {
        error("No samplesheet: pass --input samplesheet.csv (columns sample,h5ad,role), or use -profile test.")
    }
    def samples = readSamplesheet(file(params.input, checkIfExists: true))
    def references = samples.findAll { sample -> sample[0].role == 'reference' }
    def queries = samples.findAll { sample -> sample[0].role == 'query' }
    if (references.size() != 1) {
        error("The samplesheet has ${references.size()} 'reference' rows. Give exactly one.")
    }
    if (!queries) {
        error("The samplesheet has no 'query' rows. Add at least one.")
    }

    SCRCL_TRAIN(channel.fromList(references))

    // One model for every query: a value channel, so each query task reuses it.
    def ch_model = SCRCL_TRAIN.out.model.first()
    def ch_query = channel.fromList(queries)

    SCRCL_EMBED(ch_query, ch_model)
    SCRCL_CLUSTER(ch_query, ch_model)

    // Software versions of every task, from the 'versions' topic, as one YAML file.
    channel.topic('versions')
        .unique()
        .map { task_name, tool, version -> [ task_name.tokenize(':').last(), "    ${tool}: ${version}" ] }
        .groupTuple(sort: true)
        .map { process_name, lines -> "${process_name}:\n" + lines.join('\n') }
        .collectFile(name: 'software_versions.yml', storeDir: "${params.outdir}/pipeline_info", newLine: true, sort: true)
}
