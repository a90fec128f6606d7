// The AVX2 build of the row loop (compiled with -mavx2, chosen only on CPUs that have it).
#define MOE_ROUTE_ROWS route_rows_avx2
#include "route_rows.cc"
