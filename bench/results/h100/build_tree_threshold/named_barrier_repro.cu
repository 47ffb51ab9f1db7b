// Does racecheck model named barriers with a thread count? Half the block syncs on barrier 1, then
// everyone writes and reads shared memory across __syncthreads (no race by construction).
//   nvcc -gencode arch=compute_90a,code=sm_90a -O3 named_barrier_repro.cu -o repro
//   compute-sanitizer --tool racecheck ./repro 0   # every thread on barrier 0: 0 hazards
//   compute-sanitizer --tool racecheck ./repro 1   # half on "bar.sync 1, 512": 1 hazard reported
#include <cstdio>
#include <cstdlib>
__global__ void k(int* out, int named) {
  __shared__ int x[1024];
  const int tid = threadIdx.x;
  if (tid < 512) {
    x[tid] = tid;
    if (named) asm volatile("bar.sync 1, 512;" ::: "memory");
    else asm volatile("bar.sync 0;" ::: "memory");  // placeholder so both variants have the same shape
    out[tid] = x[(tid + 1) % 512];
  } else if (!named) {
    asm volatile("bar.sync 0;" ::: "memory");
  }
  __syncthreads();
  x[tid] = tid * 2;
  __syncthreads();
  out[tid] += x[1023 - tid];
}
int main(int argc, char** argv) {
  int* d; cudaMalloc(&d, 4096);
  const int named = atoi(argv[1]);
  k<<<1, 1024>>>(d, named);
  int h[1024]; cudaMemcpy(h, d, 4096, cudaMemcpyDeviceToHost);
  printf("named=%d out[0]=%d out[600]=%d err %s\n", named, h[0], h[600], cudaGetErrorString(cudaGetLastError()));
}
