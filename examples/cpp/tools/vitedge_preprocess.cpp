// vitedge_preprocess ARTIFACT/vitedge.json IMAGE.pgm|.ppm OUT.npy
// Writes the model input for IMAGE, preprocessed as vitedge.json says ([1, C, H, W] float32).
#include <iostream>

#include "vitedge/host.hpp"

int main(int argc, char** argv) {
  if (argc != 4) {
    std::cerr << "usage: vitedge_preprocess vitedge.json IMAGE.pgm|.ppm OUT.npy\n";
    return 2;
  }
  try {
    vitedge::Metadata meta = vitedge::load_metadata(argv[1]);
    vitedge::write_npy(argv[3], vitedge::load_input(argv[2], meta));
  } catch (const std::exception& e) {
    std::cerr << "vitedge_preprocess: error: " << e.what() << "\n";
    return 2;
  }
  return 0;
}
