# Fails when ptxas serializes the warpgroup MMA products of a kernel (its "Potential Performance
# Loss: wgmma.mma_async instructions are serialized ..." notes, C7515, C7520 and their kin) or
# spills its registers: such a kernel still computes the right numbers, only slower, so no
# parity test catches it.
# Runs at build time on any machine with nvcc, no GPU needed (tests/CMakeLists.txt):
#   cmake -DNVCC=... -DSOURCE_DIR=... -DSOURCES="a.cu;b.cu" -P wgmma_serialization_check.cmake
foreach(source ${SOURCES})
  execute_process(
    COMMAND ${NVCC} -std=c++20 -O3 -arch=sm_90a -I${SOURCE_DIR} -c ${SOURCE_DIR}/${source}
            -o /dev/null -Xptxas -v
    RESULT_VARIABLE status OUTPUT_VARIABLE out ERROR_VARIABLE err)
  set(log "${out}${err}")
  if(NOT status EQUAL 0)
    message(FATAL_ERROR "${source}: nvcc failed (${status}):\n${log}")
  endif()
  if(NOT log MATCHES "Compiling entry function[^\n]* for 'sm_90a'")
    message(FATAL_ERROR "${source}: no sm_90a entry function compiled:\n${log}")
  endif()
  string(REGEX MATCHALL "[^\n]*serialized[^\n]*" serialized "${log}")
  if(serialized)
    string(REPLACE ";" "\n" serialized "${serialized}")
    message(FATAL_ERROR "${source}: ptxas serializes wgmma:\n${serialized}")
  endif()
  # A spill would cost the same kernels their speed as silently: registers are set by setmaxnreg.
  string(REGEX MATCHALL "[1-9][0-9]* bytes spill (stores|loads)" spills "${log}")
  if(spills)
    message(FATAL_ERROR "${source}: ptxas spills registers: ${spills}\n${log}")
  endif()
  message(STATUS "${source}: wgmma products not serialized, no spills")
endforeach()
