"""seqio data: corpus, vocabularies, span corruption / PrefixLM / UL2 / contrastive preprocessors,
feature converters and task registration. Importing a submodule imports TensorFlow; importing this
package alone does not."""
